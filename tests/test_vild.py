"""ViLD-image on the mask segmentor (Gu et al., ICLR 2022): the L1 distillation of matched queries' region
embeddings, its teacher (crops through CLIP's image encoder, or mask-pooled `clip_dense`), what turning it on
changes (and what it leaves alone), ViLD's inference ensemble, and training through the engine."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, ImageList, Instances

from ovseg import engine as train_net
from ovseg.modeling.classifiers import ClassText, geometric_ensemble
from ovseg.modeling.criterion import SetCriterion
from tests.synthetic_panoptic import make_dataset
from tests.tiny_mask import tiny_mask_cfg

VOCAB = "red circle,green square,sky"  # "sky" is unseen
TRAIN_VOCAB = "red circle,green square"


def _build(**vild):
    torch.manual_seed(0)
    opts = {f"MODEL__MASK_SEG__VILD__{k}": v for k, v in {"CROP_SIZE": 32, **vild}.items()}
    cfg = tiny_mask_cfg(MODEL__TEXT__VOCABULARY=VOCAB, MODEL__MASK_SEG__TRAIN_VOCABULARY=TRAIN_VOCAB, **opts)
    return build_model(cfg)


def _batch():
    def inst(h, w, boxes, classes):
        i = Instances((h, w))
        i.gt_classes = torch.tensor(classes, dtype=torch.int64)
        m = torch.zeros(len(boxes), h, w, dtype=torch.bool)
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            m[k, y0:y1, x0:x1] = True
        i.gt_masks = BitMasks(m)
        return i
    g = torch.Generator().manual_seed(1)
    return [{"image": torch.rand(3, 64, 80, generator=g) * 255,
             "instances": inst(64, 80, [(0, 0, 40, 32), (40, 16, 80, 64)], [0, 1])},
            {"image": torch.rand(3, 48, 64, generator=g) * 255, "instances": inst(48, 64, [(8, 8, 40, 40)], [1])},
            {"image": torch.rand(3, 32, 32, generator=g) * 255, "instances": inst(32, 32, [], [])}]  # no segments


def test_distillation_loss_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 4, 5, generator=g)  # (B, Q, D) region embeddings, unnormalised
    targets = [{"labels": torch.tensor([0, 1]), "masks": torch.zeros(2, 8, 8),
                "clip_embeds": torch.randn(2, 5, generator=g) * 3},
               {"labels": torch.tensor([1]), "masks": torch.zeros(1, 8, 8),
                "clip_embeds": torch.randn(1, 5, generator=g)}]
    # image 0: query 3 <-> segment 1, query 0 <-> segment 0; image 1: query 2 <-> segment 0
    indices = [(torch.tensor([3, 0]), torch.tensor([1, 0])), (torch.tensor([2]), torch.tensor([0]))]
    crit = SetCriterion(matcher=lambda outputs, tgts: indices, num_points=0, deep_supervision=False,
                        vild_image_weight=0.5)

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    total = 0.0
    for b, (qs, js) in enumerate(indices):
        for q, j in zip(qs.tolist(), js.tolist()):
            e, t = unit(embeds[b, q].tolist()), unit(targets[b]["clip_embeds"][j].tolist())
            total += sum(abs(x - y) for x, y in zip(e, t))  # L1 over the D dims
    expected = 0.5 * total / 3  # weight * sum over matched pairs / number of target segments

    outputs = {"pred_logits": torch.randn(2, 4, 3, generator=g), "pred_masks": torch.randn(2, 4, 8, 8, generator=g),
               "pred_image_embeds": embeds}
    losses = crit(outputs, targets)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice", "loss_vild_image"}
    assert losses["loss_vild_image"].item() == pytest.approx(expected, rel=1e-5)
    # unmatched queries do not count: moving one changes nothing
    moved = embeds.clone()
    moved[0, 1] += 10
    assert crit({**outputs, "pred_image_embeds": moved}, targets)["loss_vild_image"].item() == pytest.approx(
        expected, rel=1e-5)
    # without the loss, the criterion neither computes nor needs it
    off = SetCriterion(matcher=lambda outputs, tgts: indices, num_points=0, deep_supervision=False)
    assert "loss_vild_image" not in off({k: v for k, v in outputs.items() if k != "pred_image_embeds"}, targets)
    with pytest.raises(ValueError, match="clip_embeds"):
        crit(outputs, [{k: v for k, v in t.items() if k != "clip_embeds"} for t in targets])


def test_crop_teacher_equals_written_out_crops():
    model = _build(ENABLED=True, CROP_SCALES=[1.0, 0.5], CROP_SIZE=16).eval()
    img = torch.randn(1, 3, 64, 64)
    masks = torch.zeros(1, 64, 64)
    masks[0, 16:48, 8:40] = 1  # a 32 x 32 box: x 8..40, y 16..48
    got = model.segment_embeddings([{"masks": masks}], ImageList(img, [(64, 64)]), torch.zeros(1, 32, 4, 4))[0]
    # scale 1: the 32-pixel box halved to 16 (bilinear, pixel centres); scale 0.5: the centred 16 x 16 box as it is
    crop1 = F.interpolate(img[:, :, 16:48, 8:40], size=(16, 16), mode="bilinear", align_corners=False)
    crop2 = img[:, :, 24:40, 16:32]
    with torch.no_grad():
        e1 = F.normalize(model.backbone.encode_image(crop1), dim=-1)
        e2 = F.normalize(model.backbone.encode_image(crop2), dim=-1)
    torch.testing.assert_close(got, F.normalize(e1 + e2, dim=-1), atol=1e-5, rtol=1e-4)

    pooled = _build(ENABLED=True, TARGET="mask_pool")
    dense = torch.randn(1, 32, 4, 4)
    grid_mask = torch.zeros(1, 64, 64)
    grid_mask[0, :32, 16:48] = 1  # cells (0..1, 1..2) of the 16-pixel grid
    got = pooled.segment_embeddings([{"masks": grid_mask}], ImageList(img, [(64, 64)]), dense)[0]
    torch.testing.assert_close(got[0], F.normalize(dense[0, :, 0:2, 1:3].mean(dim=(1, 2)), dim=0))


def _losses(model, seed=0):
    model.train()
    torch.manual_seed(seed)  # the point sampling of the mask losses
    return model(_batch())


def test_off_changes_nothing_and_on_adds_only_its_term():
    off, on = _build(), _build(ENABLED=True, ENSEMBLE=False)
    assert off.vild_head is None and not any("vild" in k for k in off.state_dict())
    new = {k for k in on.state_dict()} - set(off.state_dict())
    assert new and all(k.startswith("vild_head.") for k in new)
    for k, v in off.state_dict().items():  # the same initialisation: the head is built last
        torch.testing.assert_close(on.state_dict()[k], v)

    lo, ln = _losses(off), _losses(on)
    layers = len(off.transformer_decoder.layers)
    vild_keys = {"loss_vild_image"} | {f"loss_vild_image_{i}" for i in range(layers)}
    assert set(ln) == set(lo) | vild_keys and not set(lo) & vild_keys
    for k, v in lo.items():
        torch.testing.assert_close(ln[k], v)

    # inference: the head is unused without its ensemble
    off.eval(), on.eval()
    batch = [{"image": b["image"]} for b in _batch()]
    with torch.no_grad():
        a, b = off(batch), on(batch)
    for x, y in zip(a, b):
        torch.testing.assert_close(x["sem_seg"], y["sem_seg"])
        assert torch.equal(x["panoptic_seg"][0], y["panoptic_seg"][0])


@pytest.mark.parametrize("into_decoder", [True, False])
def test_gradients_of_the_distillation(into_decoder):
    model = _build(ENABLED=True, DISTILL_INTO_DECODER=into_decoder)
    if not into_decoder:  # a trainable CLIP block: the teacher's crops must still send it nothing
        for p in model.backbone.tower.blocks[-1].parameters():
            p.requires_grad_(True)
    losses = _losses(model)
    distill = sum(v for k, v in losses.items() if k.startswith("loss_vild_image"))
    others = sum(v for k, v in losses.items() if not k.startswith("loss_vild_image"))

    def grads(module):
        return [p.grad for p in module.parameters() if p.requires_grad]

    others.backward(retain_graph=True)
    assert all(g is None for g in grads(model.vild_head))  # the head learns from its own loss only
    model.zero_grad(set_to_none=True)
    distill.backward()
    head = grads(model.vild_head)
    assert head and all(g is not None and g.abs().sum() > 0 for g in head)
    assert all(p.grad is None for p in model.backbone.parameters())  # frozen CLIP, teacher included
    assert all(p.grad is None for p in model.text_classifier.parameters())
    assert all(g is None for g in grads(model.in_vocab))  # the text classifier's own parameters
    dec = [g for g in grads(model.transformer_decoder) if g is not None]
    assert (sum(g.abs().sum() for g in dec) > 0) if into_decoder else not dec


def test_inference_ensemble_is_vilds_rule():
    model = _build(ENABLED=True).eval()
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(2, 8, 32, generator=g)
    text = F.normalize(torch.randn(3, 32, generator=g), dim=-1)
    seen = torch.tensor([True, True, False])
    images = ImageList(torch.zeros(2, 3, 64, 64), [(64, 64)] * 2)
    mask_logits, dense = torch.randn(2, 8, 16, 16, generator=g), F.normalize(torch.randn(2, 32, 4, 4), dim=1)
    model.out_vocab = False
    with torch.no_grad():
        got = model.class_probabilities(embeds, mask_logits, dense, images, ClassText(text, 3), seen)
        p_text = model.in_vocab(embeds, text).softmax(-1)  # (B, Q, C + 1), background last
        region = F.normalize(model.vild_head.proj(embeds), dim=-1)
        p_image = (100.0 * region @ text.T).softmax(-1)  # (B, Q, C), ViLD's temperature 0.01
    lam = 2 / 3
    expected = torch.empty_like(got)
    for c in range(3):
        if seen[c]:  # base: the text head dominates
            expected[..., c] = p_text[..., c] ** lam * p_image[..., c] ** (1 - lam)
        else:  # novel: the image head dominates
            expected[..., c] = p_text[..., c] ** (1 - lam) * p_image[..., c] ** lam
    expected[..., 3] = p_text[..., 3]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
    # the authors' form: cube root of p_text * p_image * (p_text on base classes, p_image on novel ones)
    third = torch.where(seen, p_text[..., :3], p_image)
    torch.testing.assert_close(got[..., :3], (p_text[..., :3] * p_image * third) ** (1 / 3), atol=1e-6, rtol=1e-4)

    # with FC-CLIP's out-of-vocabulary classifier on: ViLD's scores take the in-vocabulary classifier's place
    model.out_vocab = True
    with torch.no_grad():
        both = model.class_probabilities(embeds, mask_logits, dense, images, ClassText(text, 3), seen)
        inside = (F.interpolate(mask_logits, size=(4, 4), mode="bilinear", align_corners=False) > 0).float()
        pooled = torch.einsum("bqhw,bdhw->bqd", inside, dense) / inside.sum((2, 3))[..., None].clamp(min=1e-6)
        out_logits = 100.0 * F.normalize(pooled, dim=-1) @ text.T
    ref = geometric_ensemble(expected.log(), out_logits, seen, model.ensemble_alpha, model.ensemble_beta)
    torch.testing.assert_close(both, ref, atol=1e-5, rtol=1e-4)


def test_bad_keys_fail_clearly():
    with pytest.raises(ValueError, match="VILD.TARGET"):
        _build(ENABLED=True, TARGET="boxes")
    with pytest.raises(ValueError, match="ENSEMBLE_BETA"):
        _build(ENABLED=True, ENSEMBLE_BETA=1.5)


def test_trains_through_the_engine(tmp_path):
    train, val = make_dataset(tmp_path / "data", n_train=4, n_val=2, size=64, prefix="synth_pan_vild")
    cfg = tiny_mask_cfg(
        DATASETS__TRAIN=f"('{train}',)", DATASETS__TEST=f"('{val}',)", INPUT__DATASET_MAPPER_NAME="mask_panoptic_lsj",
        INPUT__IMAGE_SIZE=64, INPUT__MIN_SCALE=0.8, INPUT__MAX_SCALE=1.2, SOLVER__IMS_PER_BATCH=2,
        SOLVER__BASE_LR=1e-3, SOLVER__MAX_ITER=3, SOLVER__STEPS="()", SOLVER__WARMUP_ITERS=1,
        SOLVER__CHECKPOINT_PERIOD=100000, TEST__EVAL_PERIOD=0, DATALOADER__NUM_WORKERS=0,
        OUTPUT_DIR=str(tmp_path / "out"), MODEL__MASK_SEG__VILD__ENABLED=True, MODEL__MASK_SEG__VILD__CROP_SIZE=32,
        SEED=0)
    cfg.freeze()
    trainer = train_net.Trainer(cfg)
    head_before = {k: v.clone() for k, v in trainer.model.vild_head.state_dict().items()}
    trainer.train()
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.json").read_text().splitlines()]
    values = [r["loss_vild_image"] for r in rows if "loss_vild_image" in r]
    assert values and all(math.isfinite(v) and v > 0 for v in values)
    after = trainer.model.vild_head.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in head_before.items())  # the optimizer updates the head
