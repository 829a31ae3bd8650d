"""The dense encoder against open_clip / timm themselves."""
import pytest
import torch
import torch.nn.functional as F

from ovseg.modeling.backbone import CLIPViTDenseEncoder, resize_pos_embed
from ovseg.modeling.clip_model import split_clip
from tests.helpers import TINY_MODELS

TOL = dict(atol=1e-5, rtol=1e-5)


def _reference(model, x, indices):
    """open_clip's own intermediates (NCHW) and image embedding, computed before the model is split."""
    visual = model.visual
    if hasattr(visual, "trunk"):
        inter = visual.trunk.forward_intermediates(x, indices=indices, intermediates_only=True)
    else:
        inter = visual.forward_intermediates(x, indices=indices, intermediates_only=True)["image_intermediates"]
    return inter, model.encode_image(x)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_attention_mode_matches_open_clip(tiny_clip, name):
    model = tiny_clip(name)
    x = torch.randn(2, 3, 64, 64)  # native resolution of the tiny configs
    depth = 3
    with torch.no_grad():
        ref_inter, ref_image = _reference(model, x, list(range(depth)))
        visual, _ = split_clip(model)
        enc = CLIPViTDenseEncoder(visual=visual, feature_blocks=list(range(depth)), dense_mode="attention")
        feats = enc(x)
        image = enc.encode_image(x)
    for k, ref in enumerate(ref_inter):
        torch.testing.assert_close(feats[f"res{k + 2}"], ref, **TOL)
    torch.testing.assert_close(image, ref_image, **TOL)
    # attention-mode dense map = open_clip's final tokens through its own norm + projection
    ref_dense = enc.tower.head(ref_inter[-1].flatten(2).transpose(1, 2))
    ref_dense = F.normalize(ref_dense, dim=-1).transpose(1, 2).reshape(2, -1, 4, 4)
    torch.testing.assert_close(feats["clip_dense"], ref_dense, **TOL)


def _identity_attention_last_block(visual, x):
    """open_clip's own modules with the last block's attention forced to the identity (diagonal mask):
    the value path, computed independently of ovseg's code."""
    n = x.shape[1]
    mask = torch.full((n, n), float("-inf")).fill_diagonal_(0.0)
    if hasattr(visual, "trunk"):
        t = visual.trunk
        rope = t.rope.get_embed()
        for blk in t.blocks[:-1]:
            x = blk(x, rope=rope)
        x = t.blocks[-1](x, rope=rope, attn_mask=mask)
        return visual.head(t.head(t.fc_norm(t.norm(x))))
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)
    x = visual.transformer.resblocks[-1](x, attn_mask=mask)
    return visual.ln_post(x) @ visual.proj


@pytest.mark.parametrize("name", TINY_MODELS)
def test_value_mode_is_identity_attention(tiny_clip, name):
    model = tiny_clip(name, seed=1)
    visual, _ = split_clip(model)
    enc = CLIPViTDenseEncoder(visual=visual, dense_mode="value")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens, _ = enc.tower.embed(x)
        ref = F.normalize(_identity_attention_last_block(visual, tokens)[:, 1:], dim=-1)
        dense = enc(x)["clip_dense"]
    assert dense.shape == (2, enc.embed_dim, 4, 4)
    torch.testing.assert_close(dense.flatten(2).transpose(1, 2), ref, **TOL)
    torch.testing.assert_close(dense.norm(dim=1), torch.ones(2, 4, 4), **TOL)


def test_pos_embed_resize_identity_and_shape():
    pos = torch.randn(1 + 4 * 4, 8)
    assert resize_pos_embed(pos, (4, 4), (4, 4), 1) is pos
    # the interpolation itself is the identity at the native size too (no short-cut involved)
    grid = pos[1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    same = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(same, grid)
    out = resize_pos_embed(pos, (4, 4), (6, 3), 1)
    assert out.shape == (1 + 18, 8)
    torch.testing.assert_close(out[0], pos[0])


@pytest.mark.parametrize("name", TINY_MODELS)
def test_any_input_size_is_padded_not_cropped(tiny_clip, name):
    visual, _ = split_clip(tiny_clip(name))
    enc = CLIPViTDenseEncoder(visual=visual)
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        out = enc(x)
        padded = enc(F.pad(x, (0, 96 - 90, 0, 80 - 70)))
    assert out["clip_dense"].shape[-2:] == (5, 6)  # ceil(70/16), ceil(90/16)
    for k, v in out.items():
        assert v.shape[-1] * enc.output_shape()[k].stride == 96
        torch.testing.assert_close(v, padded[k])


def test_frozen_by_default_and_unlock_last_blocks(tiny_clip):
    visual, _ = split_clip(tiny_clip())
    enc = CLIPViTDenseEncoder(visual=visual)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert enc.training and not any(m.training for m in enc.tower.modules())

    visual, _ = split_clip(tiny_clip())
    enc = CLIPViTDenseEncoder(visual=visual, unlock_last_blocks=1)
    trainable = {id(p) for p in enc.parameters() if p.requires_grad}
    assert trainable and trainable == {id(p) for p in enc.tower.blocks[2].parameters()}
    enc.train()
    assert enc.tower.blocks[2].training and not enc.tower.blocks[1].training
    # gradients reach the unlocked block through clip_dense
    enc(torch.randn(1, 3, 32, 32))["clip_dense"].sum().backward()
    assert all(p.grad is not None for p in enc.tower.blocks[2].parameters())


def test_bad_config_values(tiny_clip):
    visual, _ = split_clip(tiny_clip())
    with pytest.raises(ValueError, match="valid modes"):
        CLIPViTDenseEncoder(visual=visual, dense_mode="magic")
    with pytest.raises(ValueError, match="FEATURE_BLOCKS"):
        CLIPViTDenseEncoder(visual=visual, feature_blocks=[7])


def test_eva_at_another_grid_matches_timm_dynamic_size(tiny_clip):
    """Off the native grid, the EVA tower's RoPE must equal what timm's own EVA computes with
    `dynamic_img_size=True` (its RoPE then built per input shape), loaded with the same weights. The absolute
    pos-embed is zeroed: its resize is tested on its own, and timm's (antialiased bicubic) differs from ours."""
    from timm.models.eva import Eva

    model = tiny_clip(TINY_MODELS[1], seed=2)
    visual, _ = split_clip(model)
    trunk = visual.trunk
    with torch.no_grad():
        trunk.pos_embed.zero_()
    dynamic = Eva(img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=4, qkv_fused=False,
                  mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True,
                  ref_feat_shape=(4, 4), num_classes=0, dynamic_img_size=True).eval()
    dynamic.load_state_dict(trunk.state_dict(), strict=False)
    enc = CLIPViTDenseEncoder(visual=visual, feature_blocks=[0, 1, 2], dense_mode="attention")
    x = torch.randn(1, 3, 80, 96)  # 5 x 6 patches, native is 4 x 4
    with torch.no_grad():
        ref = dynamic.forward_intermediates(x, indices=[0, 1, 2], intermediates_only=True)
        feats = enc(x)
    for k, r in enumerate(ref):
        torch.testing.assert_close(feats[f"res{k + 2}"], r, **TOL)
    torch.testing.assert_close(enc.tower.rope_at((5, 6)), dynamic.rope.get_embed(shape=[5, 6]), **TOL)


def test_eva_rope_adapter_refuses_a_changed_timm(tiny_clip, monkeypatch):
    """A timm whose dynamic-size RoPE no longer reproduces the native one is an error naming timm, not a silent
    shift of every EVA feature."""
    from timm.layers import RotaryEmbeddingCat

    from ovseg.modeling.backbone import clip_vit

    visual, _ = split_clip(tiny_clip(TINY_MODELS[1]))
    real = RotaryEmbeddingCat.get_embed
    monkeypatch.setattr(RotaryEmbeddingCat, "get_embed",
                        lambda self, shape=None: real(self, shape) * (1.5 if shape is not None else 1.0))
    with pytest.raises(RuntimeError, match="timm .* tested with timm"):
        clip_vit.EvaTower(visual)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_block_count_errors_name_the_model_and_its_depth(name):
    from ovseg.modeling.clip_model import load_clip_towers
    from tests.helpers import tiny_cfg

    cfg = tiny_cfg(MODEL__CLIP__MODEL_NAME=name, MODEL__CLIP__UNLOCK_LAST_BLOCKS=12)
    visual, _ = load_clip_towers(cfg)
    depth = len(visual.trunk.blocks if hasattr(visual, "trunk") else visual.transformer.resblocks)  # open_clip's
    with pytest.raises(ValueError, match=rf"UNLOCK_LAST_BLOCKS=12 not in \[0, {depth}\]: the visual tower of "
                                         rf"{name} has {depth} blocks"):
        CLIPViTDenseEncoder(cfg, visual=visual)
    cfg.MODEL.CLIP.UNLOCK_LAST_BLOCKS = 0
    cfg.MODEL.CLIP.FEATURE_BLOCKS = [0, depth]
    with pytest.raises(ValueError, match=rf"FEATURE_BLOCKS has {depth}, but the visual tower of {name} has {depth} "
                                         rf"blocks \(0..{depth - 1}\)"):
        CLIPViTDenseEncoder(cfg, visual=visual)
