"""Host reads (syncs on a GPU) of the inference path, counted with torch.profiler on CPU, and float32 outputs
under bf16 autocast (issue #12)."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from torch.profiler import ProfilerActivity, profile, record_function

from ovseg.modeling.postprocessing import OutputMasks, instance_inference, panoptic_inference, semantic_inference
from ovseg.modeling.region_pooling import region_scores
from ovseg.modeling.transformer_decoder.masked_attention import MaskedAttentionDecoder
from tests.tiny_mask import tiny_mask_cfg

# ops that make the host wait for the device: item / int / float / bool of a tensor, nonzero (also inside
# boolean indexing), unique, masked_select; `.tolist()` records no aten op and is counted by a wrapper
_SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::unique_dim",
             "aten::unique_consecutive", "aten::masked_select", "test::tolist"}


def host_reads(fn, *args, **kwargs):
    """(result, number of host reads while running fn)."""
    real = torch.Tensor.tolist

    def tolist(self):
        with record_function("test::tolist"):
            return real(self)

    torch.Tensor.tolist = tolist
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = fn(*args, **kwargs)
    finally:
        torch.Tensor.tolist = real
    return out, sum(e.name in _SYNC_OPS for e in prof.events())


def _case(seed=0, q=24, k=6):
    g = torch.Generator().manual_seed(seed)
    probs = torch.full((q, k + 1), 0.01)
    probs[torch.arange(q), torch.randint(0, k, (q,), generator=g)] = 0.95  # every query confident
    probs = probs / probs.sum(-1, keepdim=True)
    logits = torch.randn(q, 6, 7, generator=g) * 4
    return probs, OutputMasks(logits, (24, 28), (22, 27), (30, 37)), torch.arange(k) % 2 == 0


def test_panoptic_reads_the_host_twice_whatever_the_number_of_segments():
    probs, masks, is_thing = _case()
    (_, segments), reads = host_reads(panoptic_inference, probs, masks, is_thing, 0.8, 0.0)
    assert len(segments) >= 4  # several segments: a per-segment read would show
    assert reads <= 2


def test_instance_reads_the_host_once():
    probs, masks, is_thing = _case(1)
    inst, reads = host_reads(instance_inference, probs, masks, is_thing, 20)
    assert len(inst) > 1 and reads <= 1


def test_decoder_attention_mask_reads_nothing_back():
    logits = torch.randn(2, 5, 4, 6)
    logits[0, 2] = -1.0  # an empty mask: sees the whole level
    allowed, reads = host_reads(MaskedAttentionDecoder.attention_mask, logits)
    ref = logits.flatten(2) >= 0
    ref[0, 2] = True
    assert reads == 0 and torch.equal(allowed[:, 0], ref)


def test_postprocessing_outputs_are_float32_under_bf16_autocast():
    probs, masks, is_thing = _case(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sem = semantic_inference(probs.bfloat16(), masks)
        inst = instance_inference(probs.bfloat16(), masks, is_thing, 20)
        feats, text = torch.randn(5, 16).bfloat16(), F.normalize(torch.randn(3, 16), dim=-1)
        scores = region_scores(feats, text)
    assert sem.dtype == torch.float32 and inst.scores.dtype == torch.float32 and scores.dtype == torch.float32
    torch.testing.assert_close(scores, F.normalize(feats.float(), dim=-1) @ text.T)


@pytest.mark.parametrize("instance_on", [False, True])
def test_mask_segmentor_sem_seg_is_float32_under_bf16_autocast(instance_on):
    cfg = tiny_mask_cfg(MODEL__MASK_SEG__TEST__INSTANCE_ON=instance_on, MODEL__TEXT__VOCABULARY="cat,dog,sky")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model([{"image": torch.randint(0, 255, (3, 48, 64), dtype=torch.uint8)}])[0]
    assert out["sem_seg"].dtype == torch.float32
    if instance_on:
        assert out["instances"].scores.dtype == torch.float32
