"""Other checkpoint key layouts mapped onto open_clip's, so that `MODEL.CLIP.PRETRAINED` takes them as they are.

- EVA-CLIP (BAAI's EVA-CLIP code, also used by the CLIPSelf repository and its released checkpoints): the EVA02
  vision tower is `EVAVisionTransformer` under `visual.` (`blocks.N.attn.q_proj`, `q_bias`, `inner_attn_ln`,
  SwiGLU `mlp.w1/w2/w3/ffn_ln`, `head`, RoPE tables `rope.freqs_cos/sin`), while open_clip builds EVA02 through
  timm under `visual.trunk.` (`attn.q_proj.bias`, `attn.norm`, `mlp.fc1_g/fc1_x/fc2/norm`, `head`). The text tower
  is open_clip's own layout in both.
- ovseg's CLIPSelfDistiller training checkpoints (`model_final.pth`): the student's (`backbone`) visual tower and the
  text tower; the teacher's copy is dropped.
- CAT-Seg's released checkpoints (KU-CVLAB/CAT-Seg) are whole models, for MODEL.WEIGHTS: `to_model_layout` maps them
  onto `CATSegSegmentor` (the key table is in cost_aggregation.py's and meta_arch/catseg.py's docstrings).

Every source key must be matched by a rule and every target key must be produced, else a ValueError names them.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

# open_clip's text-tower names at the top level of a plain CLIP (CustomTextCLIP puts them under "text.")
_TEXT_TOP_LEVEL = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")

# EVA block sub-module -> timm EvaBlock sub-module (weights and biases alike)
_EVA_BLOCK_RENAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.q_proj": "attn.q_proj",
    "attn.k_proj": "attn.k_proj",
    "attn.v_proj": "attn.v_proj",
    "attn.inner_attn_ln": "attn.norm",
    "attn.proj": "attn.proj",
    "mlp.w1": "mlp.fc1_g",  # SwiGLU gate: silu(w1 x) * (w2 x)
    "mlp.w2": "mlp.fc1_x",
    "mlp.w3": "mlp.fc2",
    "mlp.ffn_ln": "mlp.norm",
    "mlp.fc1": "mlp.fc1",  # plain GELU MLP (EVA01-style towers)
    "mlp.fc2": "mlp.fc2",
}
_EVA_TOP_RENAMES = {
    "cls_token": "cls_token",
    "pos_embed": "pos_embed",
    "patch_embed.proj.weight": "patch_embed.proj.weight",
    "patch_embed.proj.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
    "fc_norm.weight": "fc_norm.weight",
    "fc_norm.bias": "fc_norm.bias",
    "head.weight": "head.weight",
    "head.bias": "head.bias",
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def is_eva_clip_layout(state: Dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("visual.blocks.", "visual.patch_embed.")) for k in state) and \
        not any(k.startswith("visual.trunk.") for k in state)


def is_ovseg_distiller_layout(state: Dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("teacher.tower.visual.") for k in state)


def _pick(candidates: Iterable[str], target: set) -> Optional[str]:
    for c in candidates:
        if c in target:
            return c
    return None


def _eva_visual_key(key: str, value: torch.Tensor, target: set) -> Optional[List[Tuple[str, torch.Tensor]]]:
    """(key under `visual.` of EVA-CLIP) -> [(open_clip key, tensor), ...]; [] = derived data dropped on purpose;
    None = no rule matches."""
    t = "visual.trunk."
    if key in _EVA_TOP_RENAMES:
        return [(t + _EVA_TOP_RENAMES[key], value)]
    if key in ("rope.freqs_cos", "rope.freqs_sin"):
        return []  # RoPE tables are computed from the config by timm
    m = _BLOCK_KEY.match(key)
    if m is None:
        return None
    i, rest = m.group(1), m.group(2)
    blk = f"{t}blocks.{i}."
    if rest in ("attn.rope.freqs_cos", "attn.rope.freqs_sin"):
        return []  # per-block alias of the shared RoPE module
    if rest in ("gamma_1", "gamma_2"):
        return [(blk + rest, value)]
    if rest in ("attn.q_bias", "attn.v_bias"):
        qv = rest[5]
        name = _pick((f"{blk}attn.{qv}_proj.bias", f"{blk}attn.{qv}_bias"), target)
        return [(name or f"{blk}attn.{qv}_proj.bias", value)]
    if rest == "attn.qkv.weight":  # fused projections (EVA towers without sub-LN)
        if f"{blk}attn.qkv.weight" in target:
            return [(f"{blk}attn.qkv.weight", value)]
        q, k, v = value.chunk(3, dim=0)
        return [(f"{blk}attn.q_proj.weight", q), (f"{blk}attn.k_proj.weight", k), (f"{blk}attn.v_proj.weight", v)]
    module, _, param = rest.rpartition(".")
    if module in _EVA_BLOCK_RENAMES and param in ("weight", "bias"):
        return [(f"{blk}{_EVA_BLOCK_RENAMES[module]}.{param}", value)]
    return None


def _text_key(key: str, target: set) -> Optional[str]:
    if key == "logit_scale" or key.startswith("text."):
        return key
    if key.startswith(_TEXT_TOP_LEVEL):
        return _pick(("text." + key, key), target) or "text." + key
    return None


def _check_complete(out: Dict[str, torch.Tensor], target: set, unmatched: List[str], what: str,
                    onto: str = "the open_clip model") -> None:
    missing = sorted(target - set(out))
    unexpected = sorted(set(out) - target)
    if unmatched or missing or unexpected:
        raise ValueError(
            f"{what} does not map onto {onto}: "
            f"{len(unmatched)} source keys match no rule {unmatched[:8]}, "
            f"{len(missing)} model keys not provided {missing[:8]}, "
            f"{len(unexpected)} converted keys unknown to the model {unexpected[:8]}"
        )


def convert_eva_clip_state_dict(state: Dict[str, torch.Tensor], target_keys: Iterable[str]
                                ) -> Dict[str, torch.Tensor]:
    """Map an EVA-CLIP-layout state dict onto open_clip's timm-EVA02 layout.

    Args:
        state: EVA-CLIP keys (`visual.blocks.0.attn.q_proj.weight`, ..., `text.*`, `logit_scale`), without the
            "module." prefix.
        target_keys: the state-dict keys of the open_clip model it is meant for (decides between equivalent
            names of different timm versions, and is checked for completeness).
    Returns:
        the open_clip-layout state dict; raises ValueError on any unmatched, missing or unknown key.
    """
    target = set(target_keys)
    out: Dict[str, torch.Tensor] = {}
    unmatched = []
    for key, value in state.items():
        if key.startswith("visual."):
            mapped = _eva_visual_key(key[len("visual."):], value, target)
        else:
            name = _text_key(key, target)
            mapped = None if name is None else [(name, value)]
        if mapped is None:
            unmatched.append(key)
            continue
        for k, v in mapped:
            if k in out:
                raise ValueError(f"EVA-CLIP checkpoint: two source keys map to {k!r}")
            out[k] = v
    # EVA has no key bias; timm versions that keep one get zeros (what EVA computes)
    for k in target - set(out):
        m = re.match(r"^(visual\.trunk\.blocks\.\d+\.attn\.)(k_proj\.bias|k_bias)$", k)
        if m is None:
            continue
        q_bias = out.get(m.group(1) + "q_proj.bias", out.get(m.group(1) + "q_bias"))
        if q_bias is not None:
            out[k] = torch.zeros_like(q_bias)
    _check_complete(out, target, unmatched, "EVA-CLIP checkpoint")
    return out


def convert_ovseg_distiller_state_dict(state: Dict[str, torch.Tensor], target_keys: Iterable[str]
                                       ) -> Dict[str, torch.Tensor]:
    """A CLIPSelfDistiller training checkpoint -> open_clip state dict (refined student tower + text tower;
    the teacher is dropped)."""
    target = set(target_keys)
    out, unmatched = {}, []
    for key, value in state.items():
        if key.startswith("backbone.tower.visual."):
            out["visual." + key[len("backbone.tower.visual."):]] = value
        elif key.startswith("text_classifier.text_model."):
            out[key[len("text_classifier.text_model."):]] = value
        elif not key.startswith("teacher."):
            unmatched.append(key)
    _check_complete(out, target, unmatched, "CLIPSelfDistiller checkpoint")
    return out


LAYOUTS: List[Tuple[str, Callable, Callable]] = [
    ("EVA-CLIP", is_eva_clip_layout, convert_eva_clip_state_dict),
    ("ovseg CLIPSelfDistiller", is_ovseg_distiller_layout, convert_ovseg_distiller_state_dict),
]


def to_open_clip_layout(state: Dict[str, torch.Tensor], target_keys: Iterable[str]
                        ) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """Convert `state` when it is in a known foreign layout. Returns (state, name of the layout or None)."""
    target = set(target_keys)
    for name, detect, convert in LAYOUTS:
        if detect(state):
            return convert(state, target), name
    return state, None


# ---- CAT-Seg (KU-CVLAB/CAT-Seg) whole-model checkpoints -> CATSegSegmentor ---------------------------------------
# Authors' key prefixes (cat_seg/cat_seg_model.py, cat_seg/modeling/transformer/cat_seg_predictor.py, commit 6d3a188)
CATSEG_AGGREGATOR = "sem_seg_head.predictor.transformer."
CATSEG_CLIP = "sem_seg_head.predictor.clip_model."
_LAYER = r"^layers\.(\d+)\."
# (authors' key under CATSEG_AGGREGATOR, ours under "head."); the table of cost_aggregation.py's docstring
_CATSEG_HEAD_RULES: List[Tuple[re.Pattern, Callable[[re.Match], str]]] = [(re.compile(p), f) for p, f in [
    (_LAYER + r"swin_block\.(block_[12]\.(?:norm[12]|attn\.(?:q|k|v|proj)|mlp\.fc[12])\.(?:weight|bias))$",
     lambda m: f"layers.{m[1]}.spatial.{m[2]}"),
    (_LAYER + r"swin_block\.guidance_norm\.(weight|bias)$", lambda m: f"layers.{m[1]}.spatial.guidance_norm.{m[2]}"),
    (_LAYER + r"attention\.attention\.([qkv])\.(weight|bias)$", lambda m: f"layers.{m[1]}.classes.attn.{m[2]}.{m[3]}"),
    (_LAYER + r"attention\.MLP\.([02])\.(weight|bias)$", lambda m: f"layers.{m[1]}.classes.mlp.{m[2]}.{m[3]}"),
    (_LAYER + r"attention\.(norm[12]\.(?:weight|bias)|padding_tokens|padding_guidance)$",
     lambda m: f"layers.{m[1]}.classes.{m[2]}"),
    (r"^conv1\.(weight|bias)$", lambda m: f"cost_embed.{m[1]}"),
    (r"^guidance_projection\.0\.(weight|bias)$", lambda m: f"appearance_proj.0.{m[1]}"),
    (r"^text_guidance_projection\.0\.(weight|bias)$", lambda m: f"text_proj.0.{m[1]}"),
    (r"^decoder_guidance_projection\.(\d+)\.0\.(weight|bias)$", lambda m: f"decoder_guidance_proj.{m[1]}.0.{m[2]}"),
    (r"^decoder([12])\.up\.(weight|bias)$", lambda m: f"decoder.{int(m[1]) - 1}.up.{m[2]}"),
    (r"^decoder([12])\.conv\.double_conv\.([0134])\.(weight|bias)$",
     lambda m: f"decoder.{int(m[1]) - 1}.conv.{m[2]}.{m[3]}"),
    (r"^head\.(weight|bias)$", lambda m: f"head.{m[1]}"),
]]
_CATSEG_SHIFT_MASK = re.compile(_LAYER + r"swin_block\.block_2\.attn_mask$")
# their CLIP (cat_seg/third_party/model_vpt.py) keeps q / k / v projection weights apart; nn.MultiheadAttention's
# packed `in_proj_weight` is them stacked in that order
_SPLIT_QKV = re.compile(r"^(.*\.attn\.)([qkv])_proj_weight$")


def is_catseg_layout(state: Dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(CATSEG_AGGREGATOR) for k in state)


def _catseg_clip_name(key: str) -> Optional[str]:
    """A key under CATSEG_CLIP -> our model's name (q / k / v weights still apart); None = no rule."""
    if key.startswith("visual."):
        return "backbone.tower.visual." + key[len("visual."):]
    if key == "logit_scale" or key.startswith(_TEXT_TOP_LEVEL):
        return "text_classifier.text_model." + key
    return None


def convert_catseg_state_dict(state: Dict[str, torch.Tensor], target_keys: Iterable[str],
                              shift_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Map a CAT-Seg checkpoint (the authors' `CATSeg` model state dict) onto `CATSegSegmentor`'s keys.

    Args:
        state: the authors' keys (`upsample1.weight`, `sem_seg_head.predictor.transformer.layers.0.swin_block...`,
            `sem_seg_head.predictor.clip_model.visual...`), without the "module." prefix.
        target_keys: the CATSegSegmentor's state-dict keys (checked for completeness).
        shift_mask: (num_windows, window^2, window^2) the shifted-window mask our model computes on its feature grid
            (`CATSegSegmentor.shift_window_mask()`), or None when its grid has no shift. Each stored
            `block_2.attn_mask` must equal it (else the checkpoint was trained on another grid / window); then it
            is dropped, since ours is recomputed.
    Returns:
        the converted state dict; raises ValueError naming any unmatched, missing or unknown key, an incomplete
        q / k / v triple, or an attn_mask that differs from ours.
    """
    target = set(target_keys)
    out: Dict[str, torch.Tensor] = {}
    unmatched: List[str] = []
    split: Dict[str, Dict[str, torch.Tensor]] = {}  # our attn prefix -> {"q": w, "k": w, "v": w}

    def put(name: str, value: torch.Tensor, source: str) -> None:
        if name in out:
            raise ValueError(f"CAT-Seg checkpoint: {source!r} and another key both map to {name!r}")
        out[name] = value

    for key, value in state.items():
        if key.startswith(("upsample1.", "upsample2.")):
            put(f"guidance_upsample.{int(key[8]) - 1}.{key[len('upsample1.'):]}", value, key)
        elif key.startswith(CATSEG_AGGREGATOR):
            rest = key[len(CATSEG_AGGREGATOR):]
            if _CATSEG_SHIFT_MASK.match(rest):
                if shift_mask is None:
                    raise ValueError(f"CAT-Seg checkpoint: {key} is a shifted-window mask {tuple(value.shape)}, but "
                                     "this model's spatial aggregation has no shift on its feature grid: "
                                     "MODEL.CATSEG.CLIP_RESOLUTION / WINDOW_SIZE differ from the checkpoint's")
                if value.shape != shift_mask.shape or not torch.equal(value.to(shift_mask), shift_mask):
                    raise ValueError(f"CAT-Seg checkpoint: {key} {tuple(value.shape)} differs from this model's "
                                     f"shifted-window mask {tuple(shift_mask.shape)}: MODEL.CATSEG.CLIP_RESOLUTION "
                                     "/ WINDOW_SIZE differ from the checkpoint's feature grid and window")
                continue  # recomputed by our model
            for pattern, rename in _CATSEG_HEAD_RULES:
                m = pattern.match(rest)
                if m:
                    put("head." + rename(m), value, key)
                    break
            else:
                unmatched.append(key)
        elif key.startswith(CATSEG_CLIP):
            name = _catseg_clip_name(key[len(CATSEG_CLIP):])
            m = _SPLIT_QKV.match(name) if name else None
            if name is None:
                unmatched.append(key)
            elif m:
                split.setdefault(m[1], {})[m[2]] = value
            else:
                put(name, value, key)
        else:
            unmatched.append(key)
    for prefix, parts in split.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"CAT-Seg checkpoint: {prefix} has only the {sorted(parts)} projection weights of q, k, v")
        put(prefix + "in_proj_weight", torch.cat([parts["q"], parts["k"], parts["v"]], dim=0), prefix)
    _check_complete(out, target, unmatched, "CAT-Seg checkpoint", "the CATSegSegmentor")
    return out


def to_model_layout(state: Dict[str, torch.Tensor], model: torch.nn.Module
                    ) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """A whole-model checkpoint (MODEL.WEIGHTS) converted for `model` when it is in a known foreign layout.
    Returns (state, name of the layout or None)."""
    if not is_catseg_layout(state):
        return state, None
    mask_of = getattr(model, "shift_window_mask", None)
    if mask_of is None:
        raise ValueError(f"MODEL.WEIGHTS is a CAT-Seg checkpoint but the model is a {type(model).__name__}: use a "
                         "CATSegSegmentor config (configs/catseg/, e.g. catseg_vitb16_authors)")
    return convert_catseg_state_dict(state, model.state_dict().keys(), mask_of()), "CAT-Seg"
