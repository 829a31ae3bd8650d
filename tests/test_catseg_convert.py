"""CAT-Seg's released checkpoints (the authors' key layout) -> CATSegSegmentor, through MODEL.WEIGHTS.

The authors' state dict is written out here from their module structure (github.com/KU-CVLAB/CAT-Seg, commit 6d3a188:
cat_seg/cat_seg_model.py `CATSeg`, cat_seg/modeling/transformer/model.py `Aggregator`, cat_seg/third_party/
model_vpt.py `CLIP`): names and shapes by hand, values random. No code of theirs is needed."""
import pytest
import torch
from detectron2.modeling import build_model

from ovseg.engine import UserError, load_eval_weights
from ovseg.modeling.checkpoint_layouts import convert_catseg_state_dict
from tests.test_catseg import tiny_catseg_cfg

AGG = "sem_seg_head.predictor.transformer."
CLIP = "sem_seg_head.predictor.clip_model."
# the tiny config's sizes (tests/test_catseg.py): CLIP width 64, embedding 32, grid 64 / 16 = 4, window 2
WIDTH, EMBED, HIDDEN, TXT, APP, LAYERS, PROMPTS = 64, 32, 32, 16, 16, 2, 1
DEC, DEC_G, DEC_GP, GRID, WINDOW = (32, 16), (16, 8), (8, 4), 4, 2


def authors_shift_mask(grid: int, window: int) -> torch.Tensor:
    """Swin's shifted-window mask by its definition: label the 3 x 3 bands of the grid, cut into windows, -100 where
    two tokens of a window carry different labels."""
    shift = window // 2
    label = torch.zeros(grid, grid)
    bands = [range(0, grid - window), range(grid - window, grid - shift), range(grid - shift, grid)]
    for a, rows in enumerate(bands):
        for b, cols in enumerate(bands):
            for r in rows:
                for c in cols:
                    label[r, c] = 3 * a + b
    windows = []
    for wy in range(0, grid, window):
        for wx in range(0, grid, window):
            windows.append(label[wy:wy + window, wx:wx + window].flatten())
    mask = torch.zeros(len(windows), window * window, window * window)
    for n, lab in enumerate(windows):
        for i in range(window * window):
            for j in range(window * window):
                if lab[i] != lab[j]:
                    mask[n, i, j] = -100.0
    return mask


def authors_aggregator_shapes() -> dict:
    """`Aggregator`'s parameters (and the persistent attn_mask buffer) with their shapes, module by module."""
    s = {}
    for i in range(LAYERS):
        for blk in ("block_1", "block_2"):
            p = f"layers.{i}.swin_block.{blk}."
            s.update({p + "norm1.weight": (HIDDEN,), p + "norm1.bias": (HIDDEN,),
                      p + "attn.q.weight": (HIDDEN, HIDDEN + APP), p + "attn.q.bias": (HIDDEN,),
                      p + "attn.k.weight": (HIDDEN, HIDDEN + APP), p + "attn.k.bias": (HIDDEN,),
                      p + "attn.v.weight": (HIDDEN, HIDDEN), p + "attn.v.bias": (HIDDEN,),
                      p + "attn.proj.weight": (HIDDEN, HIDDEN), p + "attn.proj.bias": (HIDDEN,),
                      p + "norm2.weight": (HIDDEN,), p + "norm2.bias": (HIDDEN,),
                      p + "mlp.fc1.weight": (4 * HIDDEN, HIDDEN), p + "mlp.fc1.bias": (4 * HIDDEN,),
                      p + "mlp.fc2.weight": (HIDDEN, 4 * HIDDEN), p + "mlp.fc2.bias": (HIDDEN,)})
        s[f"layers.{i}.swin_block.guidance_norm.weight"] = s[f"layers.{i}.swin_block.guidance_norm.bias"] = (APP,)
        p = f"layers.{i}.attention."
        s.update({p + "padding_tokens": (1, 1, HIDDEN), p + "padding_guidance": (1, 1, TXT),
                  p + "attention.q.weight": (HIDDEN, HIDDEN + TXT), p + "attention.q.bias": (HIDDEN,),
                  p + "attention.k.weight": (HIDDEN, HIDDEN + TXT), p + "attention.k.bias": (HIDDEN,),
                  p + "attention.v.weight": (HIDDEN, HIDDEN), p + "attention.v.bias": (HIDDEN,),
                  p + "MLP.0.weight": (4 * HIDDEN, HIDDEN), p + "MLP.0.bias": (4 * HIDDEN,),
                  p + "MLP.2.weight": (HIDDEN, 4 * HIDDEN), p + "MLP.2.bias": (HIDDEN,),
                  p + "norm1.weight": (HIDDEN,), p + "norm1.bias": (HIDDEN,),
                  p + "norm2.weight": (HIDDEN,), p + "norm2.bias": (HIDDEN,)})
    s.update({"conv1.weight": (HIDDEN, PROMPTS, 7, 7), "conv1.bias": (HIDDEN,),
              "guidance_projection.0.weight": (APP, EMBED, 3, 3), "guidance_projection.0.bias": (APP,),
              "text_guidance_projection.0.weight": (TXT, EMBED), "text_guidance_projection.0.bias": (TXT,),
              "head.weight": (1, DEC[1], 3, 3), "head.bias": (1,)})
    for j in range(2):
        s[f"decoder_guidance_projection.{j}.0.weight"] = (DEC_GP[j], DEC_G[j], 3, 3)
        s[f"decoder_guidance_projection.{j}.0.bias"] = (DEC_GP[j],)
        cin, cout = (HIDDEN, DEC[0]) if j == 0 else (DEC[0], DEC[1])
        p = f"decoder{j + 1}."
        s.update({p + "up.weight": (cin, cin - DEC_GP[j], 2, 2), p + "up.bias": (cin - DEC_GP[j],),
                  p + "conv.double_conv.0.weight": (cout, cin, 3, 3),
                  p + "conv.double_conv.1.weight": (cout,), p + "conv.double_conv.1.bias": (cout,),
                  p + "conv.double_conv.3.weight": (cout, cout, 3, 3),
                  p + "conv.double_conv.4.weight": (cout,), p + "conv.double_conv.4.bias": (cout,)})
    return s


def authors_state(model, seed: int = 0) -> dict:
    """A random state dict in the authors' `CATSeg` layout for the tiny model's sizes."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda shape: torch.randn(tuple(shape), generator=g)  # noqa: E731
    state = {AGG + k: rand(v) for k, v in authors_aggregator_shapes().items()}
    for i in range(LAYERS):
        state[f"{AGG}layers.{i}.swin_block.block_2.attn_mask"] = authors_shift_mask(GRID, WINDOW)
    state["upsample1.weight"], state["upsample1.bias"] = rand((WIDTH, DEC_G[0], 2, 2)), rand((DEC_G[0],))
    state["upsample2.weight"], state["upsample2.bias"] = rand((WIDTH, DEC_G[1], 4, 4)), rand((DEC_G[1],))
    # their CLIP: OpenAI's names (which open_clip keeps), q / k / v projection weights apart
    towers = [("visual.", model.backbone.tower.visual), ("", model.text_classifier.text_model)]
    for prefix, tower in towers:
        sd = tower.state_dict()
        for k, v in sd.items():
            if k.endswith("attn.in_proj_weight"):
                for part in "qkv":
                    state[CLIP + prefix + k.replace("in_proj_weight", f"{part}_proj_weight")] = \
                        rand((v.shape[0] // 3, v.shape[1]))
            else:
                state[CLIP + prefix + k] = rand(v.shape)
    return state


def ours(key: str) -> str:
    """The table of the converter's docstring, applied by plain string replacement."""
    if key.startswith("upsample"):
        return key.replace("upsample1.", "guidance_upsample.0.").replace("upsample2.", "guidance_upsample.1.")
    if key.startswith(CLIP + "visual."):
        return key.replace(CLIP + "visual.", "backbone.tower.visual.")
    if key.startswith(CLIP):
        return key.replace(CLIP, "text_classifier.text_model.")
    k = key.replace(AGG, "head.")
    for a, b in [(".swin_block.", ".spatial."), (".attention.attention.", ".classes.attn."),
                 (".attention.MLP.", ".classes.mlp."), (".attention.", ".classes."),
                 ("head.conv1.", "head.cost_embed."), ("head.guidance_projection.", "head.appearance_proj."),
                 ("head.text_guidance_projection.", "head.text_proj."),
                 ("head.decoder_guidance_projection.", "head.decoder_guidance_proj."),
                 ("head.decoder1.", "head.decoder.0."), ("head.decoder2.", "head.decoder.1."),
                 (".conv.double_conv.", ".conv.")]:
        k = k.replace(a, b)
    return k


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_catseg_cfg()
    return cfg, build_model(cfg).eval()


def test_authors_checkpoint_loads_through_model_weights(tiny, tmp_path):
    cfg, model = tiny
    state = authors_state(model)
    assert not set(state) & set(model.state_dict())  # no key is ours already
    path = tmp_path / "model_final.pth"
    torch.save({"model": state, "iteration": 79999}, path)  # their detectron2 checkpointer's file
    cfg = cfg.clone()
    cfg.MODEL.WEIGHTS = str(path)
    loaded = build_model(cfg)
    load_eval_weights(cfg, loaded)
    got = loaded.state_dict()
    placed = set()
    for k, v in state.items():
        if k.endswith("attn_mask"):
            continue
        if k.endswith(("q_proj_weight", "k_proj_weight", "v_proj_weight")):
            part = "qkv".index(k[-len("q_proj_weight")])
            name = ours(k)[:-len("q_proj_weight")] + "in_proj_weight"
            rows = got[name].shape[0] // 3
            torch.testing.assert_close(got[name][part * rows:(part + 1) * rows], v, rtol=0, atol=0)
        else:
            name = ours(k)
            torch.testing.assert_close(got[name], v, rtol=0, atol=0)
        placed.add(name)
    assert placed == set(got)  # every tensor of ours came from the file
    assert not any("attn_mask" in k for k in got)


def test_shift_mask_of_the_model_is_the_authors(tiny):
    _, model = tiny
    torch.testing.assert_close(model.shift_window_mask(), authors_shift_mask(GRID, WINDOW), rtol=0, atol=0)


@pytest.mark.parametrize("break_it,message", [
    (lambda s: s.pop(AGG + "layers.1.attention.MLP.2.bias"), "head.layers.1.classes.mlp.2.bias"),
    (lambda s: s.__setitem__(AGG + "layers.0.attention.extra.weight", torch.zeros(1)), "attention.extra.weight"),
    (lambda s: s.__setitem__("sem_seg_head.pixel_decoder.weight", torch.zeros(1)), "pixel_decoder.weight"),
    (lambda s: s.pop(CLIP + "visual.transformer.resblocks.0.attn.k_proj_weight"), "resblocks.0.attn."),
    (lambda s: s[AGG + "layers.1.swin_block.block_2.attn_mask"].__setitem__((0, 0, 1), -100.0),
     "layers.1.swin_block.block_2.attn_mask"),
    (lambda s: s.__setitem__(AGG + "layers.0.swin_block.block_2.attn_mask", torch.zeros(1, 16, 16)),
     "layers.0.swin_block.block_2.attn_mask"),
])
def test_conversion_errors_name_the_key(tiny, break_it, message):
    _, model = tiny
    state = authors_state(model)
    break_it(state)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        convert_catseg_state_dict(state, model.state_dict().keys(), model.shift_window_mask())


def test_wrong_checkpoint_is_a_user_error(tiny, tmp_path):
    cfg, model = tiny
    state = authors_state(model)
    state.pop(AGG + "head.bias")
    path = tmp_path / "broken.pth"
    torch.save({"model": state}, path)
    cfg = cfg.clone()
    cfg.MODEL.WEIGHTS = str(path)
    with pytest.raises(UserError, match=r"head\.head\.bias"):
        load_eval_weights(cfg, build_model(cfg))
    # a CAT-Seg file for another meta-architecture
    other = tiny_catseg_cfg(MODEL__META_ARCHITECTURE="CLIPDenseSegmentor")
    other.MODEL.WEIGHTS = str(path)
    other.MODEL.ALLOW_RANDOM_WEIGHTS = True
    with pytest.raises(UserError, match="CATSegSegmentor config"):
        load_eval_weights(other, build_model(other))
