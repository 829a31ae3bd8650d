"""EVA-CLIP / CLIPSelf checkpoint layout -> open_clip (timm EVA02), through MODEL.CLIP.PRETRAINED."""
import math
import os

import open_clip
import pytest
import torch
import torch.nn.functional as F

from ovseg.modeling import load_open_clip
from ovseg.modeling.checkpoint_layouts import convert_eva_clip_state_dict
from ovseg.modeling.tiny_models import TINY_EVA

HEADS = 4  # tiny EVA02 config
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _official_name(key: str) -> str:
    """open_clip/timm name -> the name EVA-CLIP's EVAVisionTransformer gives the same tensor (written from the
    EVA-CLIP model definition used by the CLIPSelf repository: src/open_clip/eva_clip/eva_vit_model.py)."""
    if not key.startswith("visual.trunk."):
        return key  # text tower and logit_scale: open_clip's own names in both
    k = key[len("visual.trunk."):]
    for timm_name, eva_name in [
        ("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"), ("attn.norm.", "attn.inner_attn_ln."),
        ("mlp.fc1_g.", "mlp.w1."), ("mlp.fc1_x.", "mlp.w2."), ("mlp.norm.", "mlp.ffn_ln."), ("mlp.fc2.", "mlp.w3."),
    ]:
        k = k.replace(timm_name, eva_name)
    return "visual." + k


def _eva_clip_state(model):
    """An EVA-CLIP-layout checkpoint of `model`, RoPE tables included (EVA-CLIP stores them once for the tower and
    once more per block, since every Attention holds the shared module)."""
    state = {_official_name(k): v.clone() for k, v in model.state_dict().items()}
    depth = len(model.visual.trunk.blocks)
    rope = torch.randn(16, 16)  # (grid cells, head dim): values are recomputed by timm, never read
    state["visual.rope.freqs_cos"], state["visual.rope.freqs_sin"] = rope.cos(), rope.sin()
    for i in range(depth):
        state[f"visual.blocks.{i}.attn.rope.freqs_cos"] = rope.cos()
        state[f"visual.blocks.{i}.attn.rope.freqs_sin"] = rope.sin()
    return state


def test_official_names_cover_the_eva_clip_definition(tiny_clip):
    keys = set(_eva_clip_state(tiny_clip(TINY_EVA)))
    for k in ["visual.cls_token", "visual.pos_embed", "visual.patch_embed.proj.weight", "visual.norm.weight",
              "visual.head.weight", "visual.head.bias", "visual.blocks.0.attn.q_proj.weight",
              "visual.blocks.0.attn.q_bias", "visual.blocks.0.attn.k_proj.weight", "visual.blocks.0.attn.v_bias",
              "visual.blocks.2.attn.inner_attn_ln.bias",
              "visual.blocks.1.mlp.w1.weight", "visual.blocks.1.mlp.w3.bias", "visual.blocks.1.mlp.ffn_ln.weight",
              "text.transformer.resblocks.0.attn.in_proj_weight", "text.text_projection", "logit_scale"]:
        assert k in keys, k
    assert not any(".trunk." in k or "fc1_g" in k for k in keys)


def test_eva_clip_checkpoint_loads_and_matches(tiny_clip, tmp_path):
    original = tiny_clip(TINY_EVA, seed=3)
    path = tmp_path / "EVA02_CLIP_tiny.pt"
    # CLIPSelf's training script saves {"epoch", "state_dict"} from a DDP-wrapped model ("module." prefix)
    torch.save({"epoch": 6, "state_dict": {"module." + k: v for k, v in _eva_clip_state(original).items()}}, path)
    loaded = load_open_clip(TINY_EVA, str(path))
    for k, v in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(2, 3, 64, 64)
    tokens = open_clip.get_tokenizer(TINY_EVA)(["a cat", "a dog"])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), original.encode_image(x))
        assert torch.equal(loaded.encode_text(tokens), original.encode_text(tokens))


def test_converted_block_computes_eva_clip_semantics(tiny_clip):
    """Independent of the renaming tables: EVA-CLIP's block maths written from its definition with the official
    tensors (SwiGLU hidden = silu(w1 x) * w2 x -> ffn_ln -> w3; attention with q_bias, no k bias, v_bias, inner
    LayerNorm, proj) against the converted timm modules."""
    torch.manual_seed(0)
    model = tiny_clip(TINY_EVA, seed=5)
    official = _eva_clip_state(model)
    for k in list(official):  # distinct random values everywhere, so that any swap shows
        official[k] = torch.randn_like(official[k])
    converted = convert_eva_clip_state_dict(official, model.state_dict().keys())
    model.load_state_dict(converted)
    blk = model.visual.trunk.blocks[1]
    o = {k[len("visual.blocks.1."):]: v for k, v in official.items() if k.startswith("visual.blocks.1.")}
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        hidden = F.silu(F.linear(x, o["mlp.w1.weight"], o["mlp.w1.bias"])) * F.linear(x, o["mlp.w2.weight"],
                                                                                     o["mlp.w2.bias"])
        hidden = F.layer_norm(hidden, hidden.shape[-1:], o["mlp.ffn_ln.weight"], o["mlp.ffn_ln.bias"], eps=1e-6)
        torch.testing.assert_close(blk.mlp(x), F.linear(hidden, o["mlp.w3.weight"], o["mlp.w3.bias"]))

        q = F.linear(x, o["attn.q_proj.weight"], o["attn.q_bias"])
        k = F.linear(x, o["attn.k_proj.weight"])
        v = F.linear(x, o["attn.v_proj.weight"], o["attn.v_bias"])
        split = lambda t: t.view(2, 5, HEADS, -1).transpose(1, 2)  # noqa: E731
        attn = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(64 // HEADS)).softmax(-1)
        y = (attn @ split(v)).transpose(1, 2).reshape(2, 5, 64)
        y = F.layer_norm(y, (64,), o["attn.inner_attn_ln.weight"], o["attn.inner_attn_ln.bias"], eps=1e-6)
        ref = F.linear(y, o["attn.proj.weight"], o["attn.proj.bias"])
        torch.testing.assert_close(blk.attn(x, rope=None), ref, atol=1e-5, rtol=1e-5)

        tokens = torch.randn(2, 5, 64)
        t = model.visual.trunk
        ref = F.linear(F.layer_norm(tokens[:, 0], (64,), official["visual.norm.weight"], official["visual.norm.bias"],
                                    eps=1e-6), official["visual.head.weight"], official["visual.head.bias"])
        torch.testing.assert_close(model.visual.head(t.forward_head(t.norm(tokens))), ref)


def test_fused_qkv_is_split(tiny_clip):
    model = tiny_clip(TINY_EVA)
    official = _eva_clip_state(model)
    qkv = torch.randn(3 * 64, 64)
    for name in ("q_proj", "k_proj", "v_proj"):
        del official[f"visual.blocks.0.attn.{name}.weight"]
    official["visual.blocks.0.attn.qkv.weight"] = qkv
    converted = convert_eva_clip_state_dict(official, model.state_dict().keys())
    assert torch.equal(converted["visual.trunk.blocks.0.attn.q_proj.weight"], qkv[:64])
    assert torch.equal(converted["visual.trunk.blocks.0.attn.k_proj.weight"], qkv[64:128])
    assert torch.equal(converted["visual.trunk.blocks.0.attn.v_proj.weight"], qkv[128:])


def test_unmatched_or_missing_keys_fail_loudly(tiny_clip, tmp_path):
    model = tiny_clip(TINY_EVA)
    keys = model.state_dict().keys()
    extra = _eva_clip_state(model)
    extra["visual.blocks.0.attn.relative_position_bias_table"] = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="relative_position_bias_table"):
        convert_eva_clip_state_dict(extra, keys)
    missing = _eva_clip_state(model)
    del missing["visual.blocks.2.mlp.w3.weight"]
    with pytest.raises(ValueError, match=r"visual\.trunk\.blocks\.2\.mlp\.fc2\.weight"):
        convert_eva_clip_state_dict(missing, keys)
    torch.save(extra, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt"):
        load_open_clip(TINY_EVA, str(tmp_path / "bad.pt"))


def test_convert_script_writes_plain_open_clip(tiny_clip, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert", os.path.join(REPO, "scripts", "convert_to_open_clip.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    original = tiny_clip(TINY_EVA, seed=7)
    torch.save(_eva_clip_state(original), tmp_path / "eva.pt")
    assert script.main(["--model-name", TINY_EVA, "--input", str(tmp_path / "eva.pt"),
                        "--output", str(tmp_path / "plain.pt")]) == 0
    plain = torch.load(tmp_path / "plain.pt")
    assert plain.keys() == original.state_dict().keys()
    assert all(torch.equal(plain[k], v) for k, v in original.state_dict().items())
    # open_clip itself reads it
    again = open_clip.create_model(TINY_EVA, pretrained=str(tmp_path / "plain.pt"))
    key = "visual.trunk.head.weight"
    assert torch.equal(again.state_dict()[key], original.state_dict()[key])
