"""SCLIP / ClearCLIP / NACLIP dense modes against written-out per-head computations over the towers' own weights."""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat

from ovseg.modeling.backbone import CLIPViTDenseEncoder
from ovseg.modeling.backbone.clip_vit import DENSE_MODE_REGISTRY, neighbourhood_bias
from ovseg.modeling.clip_model import split_clip
from tests.helpers import TINY_MODELS, TINY_VIT

TOL = dict(atol=1e-5, rtol=1e-5)
SIGMA = 1.5  # small enough for the Gaussian to differ visibly across the tiny 5x3 grid
PARAMS = {"naclip": {"sigma": SIGMA}}
QKV_MODES = [m for m, e in DENSE_MODE_REGISTRY.items() if e.mixing == "qkv"]  # the written-out ones


def _gaussian_loops(grid, sigma):
    """NACLIP's bias written out pair by pair; token 0 is the class token (no bias)."""
    h, w = grid
    n = 1 + h * w
    bias = torch.zeros(n, n)
    for a in range(h * w):
        for b in range(h * w):
            (ya, xa), (yb, xb) = divmod(a, w), divmod(b, w)
            bias[1 + a, 1 + b] = math.exp(-((ya - yb) ** 2 + (xa - xb) ** 2) / (2 * sigma ** 2))
    return bias


def _mix_per_head(q, k, v, mode, grid, num_heads):
    """q, k, v: (B, N, C) split into heads of width hd by slicing; one head at a time, softmax written out."""
    heads = []
    hd = q.shape[-1] // num_heads
    scale = hd ** -0.5

    def softmax(a):
        a = a - a.max(-1, keepdim=True).values
        return a.exp() / a.exp().sum(-1, keepdim=True)

    for h in range(num_heads):
        sl = slice(h * hd, (h + 1) * hd)
        qh, kh, vh = q[..., sl], k[..., sl], v[..., sl]
        if mode == "attention":
            a = softmax(torch.einsum("bid,bjd->bij", qh, kh) * scale)
        elif mode == "sclip":
            a = softmax(torch.einsum("bid,bjd->bij", qh, qh) * scale) + \
                softmax(torch.einsum("bid,bjd->bij", kh, kh) * scale)
        elif mode == "clearclip":
            a = softmax(torch.einsum("bid,bjd->bij", qh, qh) * scale)
        elif mode == "naclip":
            a = softmax(torch.einsum("bid,bjd->bij", kh, kh) * scale + _gaussian_loops(grid, SIGMA))
        heads.append(torch.einsum("bij,bjd->bid", a, vh))
    return torch.cat(heads, -1)  # (B, N, C)


def _vit_reference(visual, x, mode, grid):
    """open_clip ViT: tokens entering the last block -> clip_dense tokens (B, h*w, D), unnormalised."""
    blk = visual.transformer.resblocks[-1]
    y = blk.ln_1(x)
    wq, wk, wv = blk.attn.in_proj_weight.chunk(3)
    bq, bk, bv = blk.attn.in_proj_bias.chunk(3)
    o = _mix_per_head(y @ wq.T + bq, y @ wk.T + bk, y @ wv.T + bv, mode, grid, blk.attn.num_heads)
    o = blk.ls_1(o @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias)
    if mode in ("attention", "sclip"):
        x = x + o
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    else:  # ClearCLIP / NACLIP: the attention branch alone
        x = o
    return (visual.ln_post(x) @ visual.proj)[:, 1:]


def _eva_reference(visual, x, mode, grid, rope):
    """timm Eva block (separate q/k/v projections, RoPE on patch tokens, inner attention norm, SwiGLU)."""
    t = visual.trunk
    blk = t.blocks[-1]
    attn = blk.attn
    heads = attn.num_heads
    y = blk.norm1(x)
    b, n, c = y.shape
    q, k, v = attn.q_proj(y), attn.k_proj(y), attn.v_proj(y)

    def rotate(z):  # (B, N, C) -> RoPE per head on the patch tokens, back to (B, N, C)
        z = z.view(b, n, heads, -1).transpose(1, 2)
        z = torch.cat([z[:, :, :1], apply_rot_embed_cat(z[:, :, 1:], rope)], dim=2)
        return z.transpose(1, 2).reshape(b, n, c)

    o = _mix_per_head(rotate(attn.q_norm(q)), rotate(attn.k_norm(k)), v, mode, grid, heads)
    o = attn.proj(attn.norm(o))
    o = blk.gamma_1 * o if blk.gamma_1 is not None else o
    if mode in ("attention", "sclip"):
        x = x + o
        m = blk.mlp(blk.norm2(x))
        x = x + (blk.gamma_2 * m if blk.gamma_2 is not None else m)
    else:
        x = o
    return visual.head(t.head(t.fc_norm(t.norm(x))))[:, 1:]


def _tokens_before_last_block(enc, visual, img):
    """The tower's own modules up to the last block (ovseg's embed: interpolated positional embedding)."""
    x, ctx = enc.tower.embed(img)
    for blk in enc.tower.blocks[:-1]:
        x = blk(x, rope=ctx["rope"]) if hasattr(visual, "trunk") else blk(x)
    return x, ctx


@pytest.mark.parametrize("name", TINY_MODELS)
def test_reference_attention_is_the_stock_block(tiny_clip, name):
    """The written-out reference reproduces the tower's own block, so the mode checks below rest on it."""
    visual, _ = split_clip(tiny_clip(name, seed=3))
    enc = CLIPViTDenseEncoder(visual=visual, dense_mode="attention")
    img = torch.randn(2, 3, 80, 48)  # 5x3 patches: non-native (4x4), non-square
    with torch.no_grad():
        x, ctx = _tokens_before_last_block(enc, visual, img)
        if hasattr(visual, "trunk"):
            full = visual.trunk.blocks[-1](x, rope=ctx["rope"])
            ref = _eva_reference(visual, x, "attention", ctx["grid"], ctx["rope"])
        else:
            full = visual.transformer.resblocks[-1](x)
            ref = _vit_reference(visual, x, "attention", ctx["grid"])
        torch.testing.assert_close(ref, enc.tower.head(full)[:, 1:], **TOL)
        torch.testing.assert_close(enc(img)["clip_dense"].flatten(2).transpose(1, 2), F.normalize(ref, dim=-1), **TOL)


@pytest.mark.parametrize("mode", QKV_MODES)
@pytest.mark.parametrize("name", TINY_MODELS)
def test_training_free_modes_match_written_out_attention(tiny_clip, name, mode):
    visual, _ = split_clip(tiny_clip(name, seed=4))
    enc = CLIPViTDenseEncoder(visual=visual, dense_mode=mode, mode_params=PARAMS)
    img = torch.randn(2, 3, 80, 48)
    with torch.no_grad():
        x, ctx = _tokens_before_last_block(enc, visual, img)
        if hasattr(visual, "trunk"):
            ref = _eva_reference(visual, x, mode, ctx["grid"], ctx["rope"])
        else:
            ref = _vit_reference(visual, x, mode, ctx["grid"])
        dense = enc(img)["clip_dense"]  # (2, D, 5, 3)
    assert dense.shape == (2, enc.embed_dim, 5, 3)
    torch.testing.assert_close(dense.flatten(2).transpose(1, 2), F.normalize(ref, dim=-1), **TOL)


def test_modes_differ_from_each_other(tiny_clip):
    """Guards against a mode silently falling back to another one."""
    visual, _ = split_clip(tiny_clip(TINY_VIT, seed=5))
    img = torch.randn(1, 3, 80, 48)
    with torch.no_grad():
        outs = {m: CLIPViTDenseEncoder(visual=visual, dense_mode=m, mode_params=PARAMS)(img)["clip_dense"]
                for m in DENSE_MODE_REGISTRY}
    for a in DENSE_MODE_REGISTRY:
        for b in DENSE_MODE_REGISTRY:
            if a < b:
                assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)


def test_vit_positional_embedding_is_interpolated_at_non_native_size(tiny_clip):
    visual, _ = split_clip(tiny_clip(TINY_VIT))
    enc = CLIPViTDenseEncoder(visual=visual)
    img = torch.randn(1, 3, 80, 48)
    with torch.no_grad():
        tokens, ctx = enc.tower.embed(img)
        patches = visual.conv1(img).flatten(2).transpose(1, 2)  # (1, 15, C)
        grid = visual.positional_embedding[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(grid, size=(5, 3), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        ref = torch.cat([(visual.class_embedding + visual.positional_embedding[0])[None], (patches + pos)[0]])[None]
    assert ctx["grid"] == (5, 3)
    torch.testing.assert_close(tokens, visual.ln_pre(ref), **TOL)


def test_value_mode_unchanged_bit_for_bit(tiny_clip):
    """"value" is the foundation's expression, op for op: x + out_proj(v(ln_1 x)), then the MLP branch."""
    visual, _ = split_clip(tiny_clip(TINY_VIT, seed=6))
    enc = CLIPViTDenseEncoder(visual=visual, dense_mode="value")
    img = torch.randn(2, 3, 80, 48)
    with torch.no_grad():
        x, _ = _tokens_before_last_block(enc, visual, img)
        blk = visual.transformer.resblocks[-1]
        c = x.shape[-1]
        v = F.linear(blk.ln_1(x), blk.attn.in_proj_weight[2 * c:], blk.attn.in_proj_bias[2 * c:])
        x = x + blk.ls_1(blk.attn.out_proj(v))
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        ref = F.normalize(visual.ln_post(x[:, 1:]) @ visual.proj, dim=-1)
        dense = enc(img)["clip_dense"].flatten(2).transpose(1, 2)
    assert torch.equal(dense, ref)


def test_neighbourhood_bias_matches_loops():
    torch.testing.assert_close(neighbourhood_bias((5, 3), SIGMA), _gaussian_loops((5, 3), SIGMA))
    b = neighbourhood_bias((4, 6), 5.0)
    assert b.shape == (25, 25) and b[0].abs().sum() == 0 and b[:, 0].abs().sum() == 0
    assert torch.allclose(b[1:, 1:].diagonal(), torch.ones(24))


def test_bad_dense_mode_and_sigma(tiny_clip):
    visual, _ = split_clip(tiny_clip())
    with pytest.raises(ValueError, match="valid modes.*sclip.*clearclip.*naclip"):
        CLIPViTDenseEncoder(visual=visual, dense_mode="SCLIP")
    enc = CLIPViTDenseEncoder(visual=visual)
    with pytest.raises(ValueError, match="valid modes"):
        enc.forward_tokens(torch.randn(1, 3, 32, 32), dense_mode="maskclip")
    with pytest.raises(ValueError, match="NACLIP.SIGMA"):
        CLIPViTDenseEncoder(visual=visual, dense_mode="naclip", mode_params={"naclip": {"sigma": 0}})
    with pytest.raises(ValueError, match="unknown dense-mode parameters.*naclip.*sigma"):
        CLIPViTDenseEncoder(visual=visual, dense_mode="naclip", mode_params={"naclip": {"gamma": 1.0}})


def test_pos_embed_scale_factor_rule_is_the_authors(tiny_clip):
    """MODEL.CLIP.POS_EMBED_RESIZE="scale_factor" against the authors' interpolate_pos_encoding call (square
    native grid, factor (g + 0.1) / sqrt(N) per axis); the encoder applies it only when asked, ViT towers only."""
    from ovseg.modeling.backbone.clip_vit import resize_pos_embed

    visual, _ = split_clip(tiny_clip(TINY_VIT))
    pos = visual.positional_embedding.detach()  # (1 + 4*4, C)
    n = 4
    for grid in ((2, 3), (5, 7), (3, 3)):
        got = resize_pos_embed(pos, (n, n), grid, 1, rule="scale_factor")
        # SCLIP / ClearCLIP / NACLIP interpolate_pos_encoding, with sqrt(N) = n
        ref = F.interpolate(pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2),
                            scale_factor=((grid[0] + 0.1) / math.sqrt(n * n), (grid[1] + 0.1) / math.sqrt(n * n)),
                            mode="bicubic", align_corners=False, recompute_scale_factor=False)
        torch.testing.assert_close(got[1:], ref.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1))
        torch.testing.assert_close(got[:1], pos[:1])
        assert not torch.allclose(got, resize_pos_embed(pos, (n, n), grid, 1, rule="size"))  # a different rule
    assert resize_pos_embed(pos, (n, n), (n, n), 1, rule="scale_factor") is pos
    with pytest.raises(ValueError, match="POS_EMBED_RESIZE"):
        resize_pos_embed(pos, (n, n), (2, 2), 1, rule="nearest")
    x = torch.randn(1, 3, 48, 80)
    size = CLIPViTDenseEncoder(visual=visual, dense_mode="sclip")(x)["clip_dense"]
    scaled = CLIPViTDenseEncoder(visual=visual, dense_mode="sclip", pos_embed_resize="scale_factor")(x)["clip_dense"]
    assert not torch.allclose(size, scaled)
    with pytest.raises(ValueError, match="open_clip ViT"):
        CLIPViTDenseEncoder(visual=split_clip(tiny_clip(TINY_MODELS[1]))[0], pos_embed_resize="scale_factor")


def test_config_node_per_mode_reaches_the_encoder(tiny_clip):
    """Each mode's parameters come from MODEL.CLIP.<MODE>.<PARAM>, one node per registry entry with parameters."""
    from detectron2.config import get_cfg

    from ovseg.config import add_ovseg_config
    from ovseg.modeling.backbone.clip_vit import mode_params_from_config

    cfg = add_ovseg_config(get_cfg())
    for mode, entry in DENSE_MODE_REGISTRY.items():
        for param in entry.params:
            assert mode.upper() in cfg.MODEL.CLIP and param.upper() in cfg.MODEL.CLIP[mode.upper()], (mode, param)
    cfg.MODEL.CLIP.NACLIP.SIGMA = SIGMA
    visual, _ = split_clip(tiny_clip(TINY_VIT, seed=4))
    enc = CLIPViTDenseEncoder(visual=visual, dense_mode="naclip", mode_params=mode_params_from_config(cfg))
    ref = CLIPViTDenseEncoder(visual=visual, dense_mode="naclip", mode_params=PARAMS)
    default = CLIPViTDenseEncoder(visual=visual, dense_mode="naclip")
    img = torch.randn(1, 3, 80, 48)
    with torch.no_grad():
        assert torch.equal(enc(img)["clip_dense"], ref(img)["clip_dense"])
        assert not torch.allclose(enc(img)["clip_dense"], default(img)["clip_dense"])


def _count_interpolations(monkeypatch):
    calls = []
    real = F.interpolate

    def spy(*args, **kwargs):
        calls.append(kwargs.get("mode"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "interpolate", spy)
    return calls


@pytest.mark.parametrize("name", TINY_MODELS)
def test_position_embedding_and_rope_cached_per_grid(tiny_clip, name, monkeypatch):
    """A second forward at the same grid resizes nothing and gives the same output as a fresh encoder; a weight
    change (in place or through load_state_dict) is seen at once."""
    visual, _ = split_clip(tiny_clip(name, seed=7))
    enc = CLIPViTDenseEncoder(visual=visual, dense_mode="naclip")
    img = torch.randn(1, 3, 80, 48)  # non-native 5x3 grid
    calls = _count_interpolations(monkeypatch)
    rope_calls = []
    if enc.tower.rope_at if hasattr(enc.tower, "rope_at") else None:
        twin = enc.tower.rope_at.twin
        real_get = twin.get_embed
        monkeypatch.setattr(twin, "get_embed", lambda *a, **k: rope_calls.append(k) or real_get(*a, **k))
    with torch.no_grad():
        first = enc(img)["clip_dense"]
        n_first, r_first = len(calls), len(rope_calls)
        second = enc(img)["clip_dense"]
    assert n_first >= 1 and len(calls) == n_first  # bicubic resize on the first forward only
    assert len(rope_calls) == r_first  # RoPE table at the 5x3 grid built once (EVA) / never (ViT)
    assert torch.equal(first, second)
    pos = visual.positional_embedding if hasattr(visual, "positional_embedding") else visual.trunk.pos_embed
    state = {k: v.clone() for k, v in enc.state_dict().items()}
    with torch.no_grad():
        pos.mul_(2.0)  # in place: the cache must notice
        edited = enc(img)["clip_dense"]
        fresh = CLIPViTDenseEncoder(visual=visual, dense_mode="naclip")
        fresh.tower.pos_cache.clear()
        assert torch.equal(edited, fresh(img)["clip_dense"])
        assert not torch.allclose(edited, first)
        enc.load_state_dict(state)
        assert torch.equal(enc(img)["clip_dense"], first)


def test_every_dense_mode_is_documented_and_offered_by_the_demo():
    """The README's training-free section names each registry mode, and the demo's --dense-mode offers them."""
    import importlib.util
    from pathlib import Path

    from ovseg.modeling.backbone import DENSE_MODE_REGISTRY

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## Training-free segmentation"):]
    section = section[:section.index("\n## ", 1)]
    assert [m for m in DENSE_MODE_REGISTRY if f"`{m}`" not in section] == []
    spec = importlib.util.spec_from_file_location("dense_modes_demo_cli", root / "demo" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    parser = demo.get_parser()
    for mode in DENSE_MODE_REGISTRY:
        assert parser.parse_args(["--vocab", "a", "--dense-mode", mode]).dense_mode == mode
    with pytest.raises(SystemExit):
        parser.parse_args(["--vocab", "a", "--dense-mode", "maskclip"])
