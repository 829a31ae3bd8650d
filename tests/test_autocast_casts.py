"""Fewer dtype casts under bf16 autocast (issue #12): the decoder's attention casts its packed projection and its
inputs once, and still computes nn.MultiheadAttention's result."""
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ovseg.modeling.transformer_decoder.masked_attention import attend


def tensor_casts(fn) -> int:
    """aten::_to_copy calls on tensors with a dimension (device kernels on a GPU; 0-dim Python numbers excluded)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return sum(e.name == "aten::_to_copy" and e.input_shapes[0] != [] for e in prof.events())


def test_self_attention_under_bf16_autocast_casts_each_tensor_once_and_matches_fp32():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x, pos = torch.randn(2, 10, 32), torch.randn(2, 10, 32)
    with torch.no_grad():
        ref = mha(x + pos, x + pos, x, need_weights=False)[0]

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                with_pos = x + pos
                return attend(mha, with_pos, with_pos, x)

        out = run()
        casts = tensor_casts(run)
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
    # packed weight + bias, the shared query / key, the value, out_proj's weight + bias: 6 (one per chunk and
    # per projection input would be 3 + 3 + 2 + 1 + 2 = 11)
    assert casts <= 6, casts


def test_inference_reuses_the_cast_projection_until_the_weights_change():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(1, 6, 32)

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return attend(mha, x, x, x)

    run()
    assert tensor_casts(run) <= 4  # the shared query / key, the value, out_proj's weight + bias: no in_proj cast
    with torch.no_grad():
        mha.in_proj_weight.mul_(2.0)  # an update in place (optimizer step, load_state_dict): the cache is stale
        ref = mha(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(run().float(), ref, atol=5e-2, rtol=5e-2)
