"""Fewer dtype casts under bf16 autocast (issue #12): the decoder's attention casts its packed projection and its
inputs once, and still computes nn.MultiheadAttention's result."""
from contextlib import nullcontext

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ovseg.modeling.transformer_decoder.masked_attention import attend
from tests.helpers import TINY_MODELS


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


# ---- the frozen CLIP tower under autocast: weights cast once, not on every forward (issue #12) -----------------
BF16_TOL = dict(atol=3e-2, rtol=3e-2)


def _encoder(model, **kwargs):
    from ovseg.modeling.backbone import CLIPViTDenseEncoder
    from ovseg.modeling.clip_model import split_clip

    visual, _ = split_clip(model)
    return CLIPViTDenseEncoder(visual=visual, feature_blocks=[0, 1], **kwargs)


def _stock(enc, monkeypatch):
    """autocast's own behaviour: every weight cast by the op that reads it."""
    monkeypatch.setattr(enc, "low_precision_weights", lambda device_type: nullcontext())


@pytest.mark.parametrize("name", TINY_MODELS)
def test_frozen_tower_under_bf16_autocast_casts_no_weight_and_matches_open_clip(tiny_clip, name, monkeypatch):
    model = tiny_clip(name)
    x = torch.randn(1, 3, 64, 64)  # the native size, for open_clip's own forward
    amp = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.no_grad(), amp:
        ref = model.encode_image(x)  # open_clip's tower, autocast's stock casts
    enc = _encoder(model, dense_mode="sclip")  # a mode that reads every weight of the tower
    params = [(n, p) for n, p in enc.named_parameters()]
    with torch.no_grad(), amp:
        image = enc.encode_image(x)
        enc(x)  # fills the cache
        dense = enc(x)["clip_dense"]
        casts = tensor_casts(lambda: enc(x))
    torch.testing.assert_close(image.float(), ref.float(), **BF16_TOL)
    assert [(n, p) for n, p in enc.named_parameters()] == params  # the float32 weights are back in place
    assert all(p.dtype == torch.float32 for _, p in params)
    _stock(enc, monkeypatch)
    with torch.no_grad(), amp:
        stock_dense = enc(x)["clip_dense"]
        stock_casts = tensor_casts(lambda: enc(x))
    torch.testing.assert_close(dense.float(), stock_dense.float(), **BF16_TOL)
    # autocast casts every weight of a matmul / convolution layer on each forward; now none of them is cast
    layers = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)
    weights = sum(p is not None for m in enc.modules() if isinstance(m, layers) for p in m._parameters.values())
    assert casts <= stock_casts - weights, (casts, stock_casts, weights)
    if name == "ovseg-tiny-ViT-16":  # left: the image, the class and position embeddings
        assert casts <= 4, casts  # (EVA also casts q / k around timm's float32 RoPE, as timm's own tower does)


def test_cached_casts_follow_weight_updates(tiny_clip, monkeypatch):
    enc = _encoder(tiny_clip("ovseg-tiny-ViT-16"), dense_mode="value")
    x = torch.randn(1, 3, 64, 64)
    state = {k: v * 1.5 if v.dim() == 2 else v for k, v in enc.state_dict().items()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        enc(x)
        enc.load_state_dict(state)  # copy_ in place: the same storage, a new version
        after = enc(x)["clip_dense"]
        _stock(enc, monkeypatch)
        ref = enc(x)["clip_dense"]
    torch.testing.assert_close(after.float(), ref.float(), **BF16_TOL)


def test_unlocked_blocks_keep_autocast_gradients(tiny_clip, monkeypatch):
    enc = _encoder(tiny_clip("ovseg-tiny-ViT-16"), dense_mode="value", unlock_last_blocks=1)
    x = torch.randn(1, 3, 64, 64)

    def grads():
        enc.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            enc(x)["clip_dense"].float().square().sum().backward()
        return {n: p.grad for n, p in enc.named_parameters()}

    got = grads()
    _stock(enc, monkeypatch)
    ref = grads()
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all(got[n] is None for n in got if n not in trainable)
    for n in trainable:
        assert got[n] is not None and got[n].dtype == torch.float32
        torch.testing.assert_close(got[n], ref[n], **BF16_TOL)


def test_unlocked_blocks_are_cast_once_in_inference(tiny_clip, monkeypatch):
    enc = _encoder(tiny_clip("ovseg-tiny-ViT-16"), dense_mode="sclip", unlock_last_blocks=3)
    x = torch.randn(1, 3, 64, 64)

    def run():  # one autocast region per forward, as a predictor does: autocast's own cache starts empty
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return enc(x)["clip_dense"]

    out = run()
    casts = tensor_casts(run)
    _stock(enc, monkeypatch)
    torch.testing.assert_close(out.float(), run().float(), **BF16_TOL)
    assert casts <= 4 < tensor_casts(run), casts
