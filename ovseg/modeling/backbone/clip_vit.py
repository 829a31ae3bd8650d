"""CLIP ViT dense encoder: an open_clip visual tower as a detectron2 Backbone.

Two tower families are supported through small adapters over the towers' own modules (no copy of CLIP):
open_clip's `VisionTransformer` (OpenAI / LAION ViT-B-16, ViT-L-14, ViT-L-14-336, ...) and timm's `Eva` as
wrapped by open_clip's `TimmModel` (EVA02-B-16, EVA02-L-14-336, ...).
"""
from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from timm.layers import RotaryEmbeddingCat, apply_rot_embed_cat
from torch import nn

from ...utils.shapes import is_symbolic
from ..clip_model import load_clip_towers
from ..low_precision import frozen_weights_in_autocast_dtype
from ..trainable import unlock_by_patterns

logger = logging.getLogger(__name__)

POS_EMBED_RESIZE_RULES = ("size", "scale_factor")


def resize_pos_embed(pos: torch.Tensor, old_grid: Tuple[int, int], new_grid: Tuple[int, int],
                     num_prefix: int, rule: str = "size") -> torch.Tensor:
    """Bicubically resize a (num_prefix + h0*w0, C) positional embedding to a (h, w) patch grid.

    `rule` says how output cells map onto the native grid:
      - "size": interpolation to the target size (output cell i reads (i + 0.5) * h0 / h - 0.5);
      - "scale_factor": SCLIP / ClearCLIP / NACLIP's rule, interpolation by the factor (h + 0.1) / h0 (cell i
        reads (i + 0.5) * h0 / (h + 0.1) - 0.5: a slightly different sampling, ~3e-3 in cosine).
    Returns the (num_prefix + h*w, C) embedding; the prefix (class token) rows are kept as they are.
    """
    if rule not in POS_EMBED_RESIZE_RULES:
        raise ValueError(f"MODEL.CLIP.POS_EMBED_RESIZE={rule!r}; valid rules: {list(POS_EMBED_RESIZE_RULES)}")
    if not is_symbolic(new_grid) and tuple(old_grid) == tuple(new_grid):  # a symbolic grid: resized in the graph
        return pos
    prefix, grid = pos[:num_prefix], pos[num_prefix:]
    channels = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], channels).permute(0, 3, 1, 2).float()  # (1, C, h0, w0)
    if rule == "size":
        grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    elif is_symbolic(new_grid):
        # torch.export at any image size: F.interpolate would fix the scale factor to the traced one's value
        rows, cols = (bicubic_matrix(n, o, o / (n + 0.1), grid.device) for n, o in zip(new_grid, old_grid))
        resampled = torch.einsum("yh,bchw,xw->bcyx", rows, grid, cols)
        # at the native grid the eager path above uses the embedding as it is (this rule is no identity there):
        # the same choice, as a tensor condition the graph keeps for every size
        native = (torch.full((), new_grid[0], device=grid.device) == old_grid[0]) & \
            (torch.full((), new_grid[1], device=grid.device) == old_grid[1])
        unchanged = F.pad(grid, (0, new_grid[1] - old_grid[1], 0, new_grid[0] - old_grid[0]))  # the grid when native
        grid = torch.where(native, unchanged, resampled)
    else:
        factor = tuple((n + 0.1) / o for n, o in zip(new_grid, old_grid))
        grid = F.interpolate(grid, scale_factor=factor, mode="bicubic", align_corners=False)
        if tuple(grid.shape[-2:]) != tuple(new_grid):  # floor(o * (n + 0.1) / o) = n unless rounding bites
            raise RuntimeError(f"positional embedding resized to {tuple(grid.shape[-2:])}, expected {new_grid}")
    grid = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], channels)
    return torch.cat([prefix, grid], dim=0)


def bicubic_matrix(n_out, n_in: int, step, device=None) -> torch.Tensor:
    """(n_out, n_in) weights of PyTorch's bicubic resampling along one axis (align_corners=False, a = -0.75, border
    indices clamped), output sample i reading input position (i + 0.5) * step - 0.5: `F.interpolate(...,
    scale_factor=1 / step, mode="bicubic")` as a matrix, for an `n_out` known only as a symbol (torch.export)."""
    a = -0.75
    src = (torch.arange(n_out, device=device, dtype=torch.float32) + 0.5) * step - 0.5
    start = src.floor()
    t = src - start

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=1)  # (n_out, 4)
    taps = (start.long()[:, None] + torch.arange(-1, 3, device=device)).clamp(0, n_in - 1)  # (n_out, 4)
    onehot = taps[..., None] == torch.arange(n_in, device=device)  # (n_out, 4, n_in)
    return (onehot * weights[..., None]).sum(1)


class PerGridCache:
    """Tensors derived from a weight at one patch grid (resized position embeddings, RoPE tables), kept for the
    last `maxsize` keys: they cost a bicubic resize per forward otherwise. An entry is keyed on the weight's
    storage, device, dtype and in-place version counter, so loading or editing the weight makes a new entry;
    nothing is cached while the weight takes gradients (the graph must be rebuilt each forward)."""

    def __init__(self, maxsize: int = 8):
        self.maxsize = maxsize
        self._store: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()

    def get(self, key: tuple, weight: torch.Tensor, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if weight.requires_grad and torch.is_grad_enabled():
            return make()
        if is_symbolic(key):  # a grid known only as symbols (torch.export at any image size): computed in the graph
            return make()
        # `_version` is bumped by every in-place write (load_state_dict's copy_, optimizer steps, no_grad edits)
        full = (key, weight.device, weight.dtype, weight.data_ptr(), weight._version)
        hit = self._store.get(full)
        if hit is None:
            hit = self._store[full] = make().detach()
            while len(self._store) > self.maxsize:
                self._store.popitem(last=False)
        else:
            self._store.move_to_end(full)
        return hit

    def clear(self) -> None:
        self._store.clear()


# timm versions the EVA02 adapter below is tested with (setup.py declares the same range;
# tests/test_library_versions.py runs the parity tests on both ends)
TIMM_TESTED = ("1.0.17", "1.0.31")
# RotaryEmbeddingCat constructor arguments that are also public attributes and shape the embedding; the coordinate
# augmentations (shift/jitter/rescale_coords) are training-only in timm and our RoPE module is always in eval mode
_ROPE_ARGS = ("dim", "max_res", "temperature", "in_pixels", "linear_bands", "ref_feat_shape", "grid_offset",
              "grid_indexing", "rotate_half", "grid_type", "normalize_coords")


class RopeAtAnyGrid:
    """timm's EVA RoPE (`RotaryEmbeddingCat`) at any patch grid, through timm's public API only.

    timm builds an EVA tower's RoPE for its native grid (`get_embed()` then ignores `shape`). For other grids this
    keeps a second `RotaryEmbeddingCat` in timm's dynamic-size mode (`feat_shape=None`), made from the tower's
    rope's constructor arguments, and asks it for `get_embed(shape=grid)`, as timm's own EVA does with
    `dynamic_img_size=True`. At construction the twin must reproduce the native-grid embedding: a timm whose
    RoPE semantics changed fails there with one clear error, never with wrong features.
    """

    def __init__(self, rope: nn.Module, native_grid: Tuple[int, int]):
        if type(rope) is not RotaryEmbeddingCat:
            raise NotImplementedError(f"EVA tower with {type(rope).__name__} RoPE; only timm's RotaryEmbeddingCat "
                                      "(EVA02) is supported")
        self.rope = rope
        self.native_grid = tuple(native_grid)
        params = inspect.signature(RotaryEmbeddingCat.__init__).parameters
        kwargs = {k: getattr(rope, k) for k in _ROPE_ARGS if k in params and hasattr(rope, k)}
        if rope.in_pixels and "linear_bands" in params and not hasattr(rope, "linear_bands"):
            # older timm does not keep `linear_bands`; it only matters for pixel-frequency bands
            raise NotImplementedError(self._version_message("a pixel-band RoPE whose `linear_bands` is not stored"))
        with torch.no_grad():
            self.twin = RotaryEmbeddingCat(**kwargs, feat_shape=None)
            self.twin.eval()
            native = rope.get_embed()
            rebuilt = self.twin.get_embed(shape=list(self.native_grid))
        if native.shape != rebuilt.shape or not torch.allclose(rebuilt.float(), native.float().cpu(), atol=1e-4):
            raise RuntimeError(self._version_message("the rebuilt RoPE differs from timm's at the native grid"))
        self.cache = PerGridCache()

    @staticmethod
    def _version_message(problem: str) -> str:
        return (f"timm {timm.__version__}: {problem}. ovseg's EVA02 support is tested with timm "
                f"{TIMM_TESTED[0]}..{TIMM_TESTED[1]}; install a timm in that range (pip install "
                f"'timm>={TIMM_TESTED[0]},<1.1').")

    def __call__(self, grid: Tuple[int, int]) -> torch.Tensor:
        """Concatenated (sin, cos) RoPE for a (h, w) patch grid: (h*w, 2 * head_dim), on the rope's device."""
        native = self.rope.get_embed()
        if tuple(grid) == self.native_grid:
            return native

        def make():
            with torch.no_grad():
                return self.twin.get_embed(shape=list(grid)).to(device=native.device, dtype=native.dtype)

        return self.cache.get(tuple(grid), native, make)


def apply_rope(x: torch.Tensor, rope: torch.Tensor, half: bool) -> torch.Tensor:
    """timm's `apply_rot_embed_cat` on (B, heads, N, hd); `half` (the rotate-half layout) exists in newer timm
    only, so it is passed only when set."""
    return apply_rot_embed_cat(x, rope, half=True) if half else apply_rot_embed_cat(x, rope)


def neighbourhood_bias(grid: Tuple[int, int], sigma: float, num_prefix: int = 1,
                       device: Optional[torch.device] = None) -> torch.Tensor:
    """NACLIP's additive attention bias: an unnormalised Gaussian of the distance between patches on the grid.

    Returns (num_prefix + h*w, num_prefix + h*w): entry (i, j) = exp(-|p_i - p_j|^2 / (2 sigma^2)) for patches
    i, j (distance in patches); rows and columns of prefix (class) tokens are 0, i.e. unbiased. The NACLIP code
    builds it by convolving a (2h-1, 2w-1) Gaussian window, which reaches every pair, so no truncation.
    """
    h, w = grid
    # (h*w,) row and column of each patch; expand + reshape rather than repeat_interleave / repeat, which the ONNX
    # exporter translates wrongly for a symbolic grid
    ys = torch.arange(h, device=device, dtype=torch.float32)[:, None].expand(h, w).reshape(-1)
    xs = torch.arange(w, device=device, dtype=torch.float32)[None, :].expand(h, w).reshape(-1)
    d2 = (ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2  # (h*w, h*w)
    return F.pad(torch.exp(-d2 / (2.0 * sigma ** 2)), (num_prefix, 0, num_prefix, 0))


def _sclip_mixing(q, k, v, scale, bias):
    # correlative self-attention: the two maps are summed, not renormalised, as in the SCLIP code;
    # (A + B) v computed as A v + B v so that SDPA never materialises a map where a fused kernel exists
    return (F.scaled_dot_product_attention(q, q, v, scale=scale)
            + F.scaled_dot_product_attention(k, k, v, scale=scale))


def _clearclip_mixing(q, k, v, scale, bias):
    return F.scaled_dot_product_attention(q, q, v, scale=scale)


def _naclip_mixing(q, k, v, scale, bias):
    # the Gaussian bias is added after the scaling
    return F.scaled_dot_product_attention(k, k, v, attn_mask=bias.to(q.dtype), scale=scale)


def _naclip_bias(grid: Tuple[int, int], num_prefix: int, device: torch.device, sigma: float) -> torch.Tensor:
    return neighbourhood_bias(grid, sigma, num_prefix, device=device)


@dataclass(frozen=True)
class DenseMode:
    """One training-free way for the last ViT block to build `clip_dense` (an entry of DENSE_MODE_REGISTRY).

    mixing: "value" (no token mixing: the value path), "attention" (the block's own attention) or "qkv" (`mix`
        over the block's own per-head queries, keys and values, with the block's attention scale; the class token
        takes part like any token).
    keep_residual: the last block keeps its residual connections and MLP; ClearCLIP and NACLIP drop both, since
        the residual stream carries the image-level signal that blurs patch features (ClearCLIP, sec. 3).
    mix: (q, k, v, scale, bias) on (B, heads, N, hd) -> (B, heads, N, hd), for mixing == "qkv".
    attn_bias: (grid, num_prefix, device, **params) -> (N, N) additive attention bias passed to `mix` as `bias`.
    residual: what the attention branch is added to when the residual is kept: "token" (each token's own input,
        the stock block) or "class" (the class token's input, for every token: CAT-Seg's dense last block).
    params: the mode's parameters and their defaults, each a positive number; in the config they are
        MODEL.CLIP.<MODE>.<PARAM> (e.g. MODEL.CLIP.NACLIP.SIGMA).
    """

    mixing: str
    keep_residual: bool
    mix: Optional[Callable[..., torch.Tensor]] = None
    attn_bias: Optional[Callable[..., torch.Tensor]] = None
    params: Mapping[str, float] = field(default_factory=dict)
    residual: str = "token"

    def __post_init__(self):
        if self.mixing not in ("value", "attention", "qkv") or (self.mixing == "qkv") != (self.mix is not None):
            raise ValueError(f"DenseMode(mixing={self.mixing!r}): 'qkv' mixing needs `mix`, the others none")
        if self.residual not in ("token", "class"):
            raise ValueError(f"DenseMode(residual={self.residual!r}): use 'token' or 'class'")

    def residual_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the last block's attention branch is added to, for its input tokens x (B, N, C)."""
        return x if self.residual == "token" else x[:, :1]


# name -> mode; MODEL.CLIP.DENSE_MODE picks one. The order is the documentation's.
DENSE_MODE_REGISTRY: Dict[str, DenseMode] = {
    "value": DenseMode("value", keep_residual=True),  # MaskCLIP / CLIPSelf
    "attention": DenseMode("attention", keep_residual=True),  # the stock block: what open_clip computes
    "sclip": DenseMode("qkv", keep_residual=True, mix=_sclip_mixing),  # (softmax(qq^T s) + softmax(kk^T s)) v
    "clearclip": DenseMode("qkv", keep_residual=False, mix=_clearclip_mixing),  # softmax(qq^T s) v
    "naclip": DenseMode("qkv", keep_residual=False, mix=_naclip_mixing, attn_bias=_naclip_bias,
                        params={"sigma": 5.0}),  # softmax(kk^T s + Gaussian(sigma)) v
    # CAT-Seg's dense CLIP (KU-CVLAB/CAT-Seg third_party/model_vpt.py, forward_dense): the value path added to the
    # class token's input, then the MLP
    "catseg": DenseMode("value", keep_residual=True, residual="class"),
}
DENSE_MODES = tuple(DENSE_MODE_REGISTRY)


def get_dense_mode(name: str, key: str = "MODEL.CLIP.DENSE_MODE") -> DenseMode:
    """The registry entry of `name`, or one clear error naming the valid modes."""
    if name not in DENSE_MODE_REGISTRY:
        raise ValueError(f"{key}={name!r}; valid modes: {list(DENSE_MODE_REGISTRY)}")
    return DENSE_MODE_REGISTRY[name]


def resolve_mode_params(params: Optional[Mapping[str, Mapping[str, float]]] = None) -> Dict[str, Dict[str, float]]:
    """Every mode's parameters: the registry's defaults overridden by `params` ({mode: {param: value}})."""
    params = params or {}
    unknown = [f"{m}.{p}" for m, ps in params.items() for p in ps
               if m not in DENSE_MODE_REGISTRY or p not in DENSE_MODE_REGISTRY[m].params]
    if unknown:
        raise ValueError(f"unknown dense-mode parameters {unknown}; modes and their parameters: "
                         f"{ {m: list(e.params) for m, e in DENSE_MODE_REGISTRY.items() if e.params} }")
    out = {}
    for m, entry in DENSE_MODE_REGISTRY.items():
        out[m] = {p: float(params.get(m, {}).get(p, d)) for p, d in entry.params.items()}
        for p, value in out[m].items():
            if not value > 0:
                raise ValueError(f"MODEL.CLIP.{m.upper()}.{p.upper()}={value} must be > 0")
    return out


def mode_params_from_config(cfg) -> Dict[str, Dict[str, float]]:
    """{mode: {param: value}} from the MODEL.CLIP.<MODE>.<PARAM> config nodes of the modes that have parameters."""
    return {m: {p: cfg.MODEL.CLIP[m.upper()][p.upper()] for p in e.params}
            for m, e in DENSE_MODE_REGISTRY.items() if e.params}


class _Tower(nn.Module):
    """What the encoder needs from a ViT: embed, blocks, a value-path last block, norm + projection."""

    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    patch_size: int
    width: int
    pos_embed_resize: str = "size"  # rule of `resize_pos_embed` at grids other than the native one

    def embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, dict]:
        """(B, 3, H, W) -> tokens (B, 1 + h*w, C) with the class token first, and per-forward context."""
        raise NotImplementedError

    def run_block(self, block: nn.Module, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        raise NotImplementedError

    def token_mixing(self, block: nn.Module, y: torch.Tensor, ctx: dict, mode: str) -> torch.Tensor:
        """The attention sub-layer's output for normed tokens `y` (B, N, C) in `mode` (a DENSE_MODE_REGISTRY
        name); towers implement "value" and "attention" mixing, "qkv" mixing is the mode's own `mix`."""
        entry = get_dense_mode(mode)
        if entry.mixing != "qkv":
            raise NotImplementedError(f"{type(self).__name__} does not implement {entry.mixing!r} mixing")
        q, k, v = self.qkv_heads(block, y, ctx)  # (B, heads, N, hd) each
        bias = None
        if entry.attn_bias is not None:
            h, w = ctx["grid"]
            bias = entry.attn_bias((h, w), y.shape[1] - h * w, y.device, **ctx["mode_params"][mode])
        return self.attn_out(block, entry.mix(q, k, v, self.attn_scale(block), bias), y)

    def qkv_heads(self, block: nn.Module, y: torch.Tensor, ctx: dict
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys, values (B, heads, N, hd) exactly as the block's attention forms them."""
        raise NotImplementedError

    def attn_scale(self, block: nn.Module) -> float:
        raise NotImplementedError

    def attn_out(self, block: nn.Module, o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-head mixed values (B, heads, N, hd) -> the attention sub-layer's output (B, N, C)."""
        raise NotImplementedError

    def matmul_weights(self) -> List[Tuple[nn.Module, str]]:
        """(module, parameter name) of weights used in matmuls outside Linear / Conv / MultiheadAttention layers
        (kept cast under autocast while frozen: `frozen_weights_in_autocast_dtype`)."""
        return []

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final norm + projection to CLIP space, token-wise: (B, L, C) -> (B, L, D)."""
        raise NotImplementedError

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The image embedding open_clip computes from the final tokens: (B, L, C) -> (B, D)."""
        raise NotImplementedError

    def last_block(self, x: torch.Tensor, ctx: dict, mode: str) -> torch.Tensor:
        """The last block with the given token mixing: residuals and MLP as in the tower for modes that keep
        the residual, the attention branch alone (layer scale included) for the others."""
        raise NotImplementedError


class OpenCLIPViTTower(_Tower):
    def __init__(self, visual: nn.Module):
        super().__init__()
        blocks = visual.transformer.resblocks
        if visual.attn_pool is not None or not hasattr(blocks[-1], "attn") or \
                not isinstance(blocks[-1].attn, nn.MultiheadAttention):
            raise NotImplementedError("only open_clip ViTs with standard blocks and token/avg pooling are supported")
        if not getattr(visual.transformer, "batch_first", True):
            raise NotImplementedError("open_clip ViT with batch_first=False is not supported")
        if getattr(visual, "pool_type", None) not in ("tok", "avg") or not hasattr(visual, "final_ln_after_pool"):
            raise NotImplementedError(f"open_clip ViT with pool_type={getattr(visual, 'pool_type', None)!r}; "
                                      "only 'tok' and 'avg' pooling are supported")
        self.visual = visual
        self.patch_size = visual.patch_size[0]
        self.width = visual.class_embedding.shape[0]
        self.native_grid = tuple(visual.grid_size)
        self.pos_cache = PerGridCache()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    def embed(self, x):
        v = self.visual
        x = v.conv1(x)  # (B, C, h, w)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + h*w, C)
        pos = self.pos_cache.get((grid, self.pos_embed_resize), v.positional_embedding, lambda: resize_pos_embed(
            v.positional_embedding, self.native_grid, grid, 1, self.pos_embed_resize))
        x = x + pos.to(x.dtype)
        x = v.patch_dropout(x)
        return v.ln_pre(x), {"grid": grid}

    def run_block(self, block, x, ctx):
        return block(x)

    def token_mixing(self, block, y, ctx, mode):
        attn = block.attn
        mixing = get_dense_mode(mode).mixing
        if mixing == "attention":
            return attn(y, y, y, need_weights=False)[0]
        if mixing == "value":
            c = y.shape[-1]
            v = F.linear(y, attn.in_proj_weight[2 * c:], attn.in_proj_bias[2 * c:])
            return attn.out_proj(v)
        return super().token_mixing(block, y, ctx, mode)

    def qkv_heads(self, block, y, ctx):
        attn = block.attn
        b, n, c = y.shape
        qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)  # (B, N, 3C)
        qkv = qkv.view(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, hd)
        return qkv[0], qkv[1], qkv[2]

    def attn_scale(self, block):
        return (block.attn.embed_dim // block.attn.num_heads) ** -0.5

    def attn_out(self, block, o, y):
        b, _, n, _ = o.shape
        return block.attn.out_proj(o.transpose(1, 2).reshape(b, n, -1))

    def last_block(self, x, ctx, mode):
        blk = self.blocks[-1]
        y = blk.ls_1(self.token_mixing(blk, blk.ln_1(x), ctx, mode))
        if not get_dense_mode(mode).keep_residual:
            return y
        x = get_dense_mode(mode).residual_input(x) + y
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))

    def matmul_weights(self):
        return [(self.visual, "proj")] if self.visual.proj is not None else []

    def head(self, tokens):
        return self.visual.ln_post(tokens) @ self.visual.proj

    def pool(self, x):
        # open_clip's VisionTransformer pooling ("tok" / "avg", layer norm before or after pooling), written
        # out from its public attributes
        v = self.visual
        if not v.final_ln_after_pool:
            x = v.ln_post(x)
        pooled = x[:, 0] if v.pool_type == "tok" else x[:, 1:].mean(dim=1)
        if v.final_ln_after_pool:
            pooled = v.ln_post(pooled)
        return pooled @ v.proj


class EvaTower(_Tower):
    def __init__(self, visual: nn.Module):
        super().__init__()
        trunk = visual.trunk
        if getattr(trunk, "reg_token", None) is not None or trunk.attn_pool is not None or \
                getattr(trunk, "rope_mixed", False):
            raise NotImplementedError("EVA towers with register tokens, attention pooling or mixed RoPE")
        self.visual = visual
        self.patch_size = trunk.patch_embed.patch_size[0]
        self.width = trunk.embed_dim
        self.native_grid = tuple(trunk.patch_embed.grid_size)
        # a plain attribute holding no parameters or buffers of its own in the state dict
        self.rope_at = RopeAtAnyGrid(trunk.rope, self.native_grid) if trunk.rope is not None else None
        self.pos_cache = PerGridCache()

    # properties, not attributes: registering these modules twice would duplicate them in state dicts
    @property
    def trunk(self) -> nn.Module:
        return self.visual.trunk

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.trunk.blocks

    def embed(self, x):
        t = self.trunk
        x = t.patch_embed.proj(x)  # (B, C, h, w)
        grid = tuple(x.shape[-2:])
        x = t.patch_embed.norm(x.flatten(2).transpose(1, 2))  # (B, h*w, C)
        cls = t.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        if t.pos_embed is not None:
            n_prefix = 0 if t.no_embed_class else t.num_prefix_tokens
            pos = self.pos_cache.get((grid, n_prefix), t.pos_embed, lambda: resize_pos_embed(
                t.pos_embed[0], self.native_grid, grid, n_prefix)).to(x.dtype)
        if t.no_embed_class:
            x = torch.cat([cls, x + pos if t.pos_embed is not None else x], dim=1)
        else:
            x = torch.cat([cls, x], dim=1)
            x = x + pos if t.pos_embed is not None else x
        x = t.pos_drop(x)
        rope = self.rope_at(grid) if self.rope_at is not None else None
        return t.norm_pre(x), {"grid": grid, "rope": rope}

    def run_block(self, block, x, ctx):
        return block(x, rope=ctx["rope"])

    def token_mixing(self, block, y, ctx, mode):
        attn = block.attn
        mixing = get_dense_mode(mode).mixing
        if mixing == "attention":
            return attn(y, rope=ctx["rope"])
        if mixing == "value":
            if attn.qkv is not None:
                c = attn.qkv.weight.shape[0] // 3
                v = F.linear(y, attn.qkv.weight[2 * c:], attn.v_bias)
            else:
                v = attn.v_proj(y)
            v = attn.norm(v)
            gate = getattr(attn, "gate", None)  # gated attention exists in newer timm only
            if gate is not None:
                v = v * gate(y).sigmoid()
            return attn.proj(v)
        return super().token_mixing(block, y, ctx, mode)

    def qkv_heads(self, block, y, ctx):
        # as timm's EvaAttention: optional q/k norms, then RoPE on the patch tokens (not the class token)
        attn = block.attn
        b, n, _ = y.shape
        if attn.qkv is not None:
            qkv = attn.qkv(y)
            if attn.q_bias is not None:
                qkv = qkv + torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            q, k, v = qkv.view(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (proj(y).view(b, n, attn.num_heads, -1).transpose(1, 2)
                       for proj in (attn.q_proj, attn.k_proj, attn.v_proj))  # (B, heads, N, hd)
        q, k = attn.q_norm(q), attn.k_norm(k)
        rope = ctx["rope"]
        if rope is not None:
            npt = attn.num_prefix_tokens
            half = getattr(attn, "rotate_half", False)  # attribute of newer timm only
            q = torch.cat([q[:, :, :npt], apply_rope(q[:, :, npt:], rope, half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt], apply_rope(k[:, :, npt:], rope, half)], dim=2).type_as(v)
        return q, k, v

    def matmul_weights(self):
        # the q / k / v biases are added to the fused qkv projection's output (timm's EvaAttention)
        return [(blk.attn, name) for blk in self.blocks for name in ("q_bias", "k_bias", "v_bias")
                if getattr(blk.attn, name, None) is not None]

    def attn_scale(self, block):
        return block.attn.scale

    def attn_out(self, block, o, y):
        attn = block.attn
        b, _, n, _ = o.shape
        o = attn.norm(o.transpose(1, 2).reshape(b, n, -1))
        gate = getattr(attn, "gate", None)
        if gate is not None:
            o = o * gate(y).sigmoid()
        return attn.proj(o)

    def last_block(self, x, ctx, mode):
        blk = self.blocks[-1]
        y = self.token_mixing(blk, blk.norm1(x), ctx, mode)
        y = blk.gamma_1 * y if blk.gamma_1 is not None else y
        if not get_dense_mode(mode).keep_residual:
            return y
        x = get_dense_mode(mode).residual_input(x) + y
        y = blk.mlp(blk.norm2(x))
        return x + (blk.gamma_2 * y if blk.gamma_2 is not None else y)

    def head(self, tokens):
        t = self.trunk
        return self.visual.head(t.head(t.fc_norm(t.norm(tokens))))

    def pool(self, x):
        return self.visual.head(self.trunk.forward_head(self.trunk.norm(x)))


def build_tower(visual: nn.Module) -> _Tower:
    if hasattr(visual, "transformer") and hasattr(visual, "conv1"):
        return OpenCLIPViTTower(visual)
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and type(trunk).__name__ == "Eva":
        return EvaTower(visual)
    raise NotImplementedError(
        f"unsupported CLIP visual tower {type(visual).__name__}: ovseg needs a ViT (open_clip VisionTransformer or "
        "timm Eva); ResNet CLIPs have no patch tokens"
    )


class CLIPViTDenseEncoder(Backbone):
    """Frozen (optionally partly trainable) CLIP ViT returning multi-level features and `clip_dense`.

    Outputs of `forward(images)` with normalised images (B, 3, H, W), any H, W (padded to the patch size):
      - "res2", "res3", ...: outputs of the blocks in `feature_blocks`, (B, C, H/p, W/p), stride p;
      - "clip_dense": (B, D, H/p, W/p), L2-normalised CLIP-space embedding of each patch, made by the last
        block in `dense_mode` followed by the final norm and projection (applied in every mode, as MaskCLIP,
        SCLIP, ClearCLIP and NACLIP all do).
    """

    @configurable
    def __init__(self, *, visual: nn.Module, feature_blocks: Sequence[int] = (), dense_mode: str = "value",
                 unlock_last_blocks: int = 0, mode_params: Optional[Mapping[str, Mapping[str, float]]] = None,
                 pos_embed_resize: str = "size", unlock_patterns: Sequence[str] = (), model_name: str = ""):
        """
        Args:
            visual: an open_clip visual tower (`model.visual`).
            feature_blocks: 0-based indices of blocks exported as res2, res3, ...; empty = 4 evenly spaced
                blocks ending with the second-to-last.
            dense_mode: how the last block mixes tokens for `clip_dense`; a DENSE_MODE_REGISTRY name.
            unlock_last_blocks: number of final blocks left trainable (0 = all frozen).
            mode_params: {mode: {param: value}} overriding the registry's defaults (e.g. {"naclip":
                {"sigma": 5.0}}, NACLIP's Gaussian std. deviation in patches).
            pos_embed_resize: how positional embeddings are resized to other grids (see `resize_pos_embed`);
                "scale_factor" is implemented for open_clip ViT towers.
            unlock_patterns: regular expressions over the visual tower's parameter names (open_clip's, e.g.
                "attn.(q|v)_proj" for EVA's q / v projections) also left trainable
                (`unlock_by_patterns`).
            model_name: the CLIP's name (MODEL.CLIP.MODEL_NAME), for error messages only.
        """
        super().__init__()
        get_dense_mode(dense_mode)
        self.tower = build_tower(visual)
        if pos_embed_resize not in POS_EMBED_RESIZE_RULES:
            raise ValueError(f"MODEL.CLIP.POS_EMBED_RESIZE={pos_embed_resize!r}; valid rules: "
                             f"{list(POS_EMBED_RESIZE_RULES)}")
        if pos_embed_resize != "size" and not isinstance(self.tower, OpenCLIPViTTower):
            raise ValueError(f"MODEL.CLIP.POS_EMBED_RESIZE={pos_embed_resize!r} is implemented for open_clip ViT "
                             f"towers only, not {type(self.tower).__name__}; use 'size'")
        self.tower.pos_embed_resize = pos_embed_resize
        depth = len(self.tower.blocks)
        if not feature_blocks:
            # ends of the four quarters of the tower; the last block is the dense block, so its neighbour
            feature_blocks = sorted({min(max(depth * k // 4 - 1, 0), max(depth - 2, 0)) for k in range(1, 5)})
        # configs are written for one CLIP (ViT-B/16: 12 blocks); a shallower one needs these keys set to fit
        tower = f"the visual tower of {model_name or type(visual).__name__} has {depth} blocks"
        for i in feature_blocks:
            if not 0 <= i < depth:
                raise ValueError(f"MODEL.CLIP.FEATURE_BLOCKS has {i}, but {tower} (0..{depth - 1}): set "
                                 "MODEL.CLIP.FEATURE_BLOCKS for this model")
        if not 0 <= unlock_last_blocks <= depth:
            raise ValueError(f"MODEL.CLIP.UNLOCK_LAST_BLOCKS={unlock_last_blocks} not in [0, {depth}]: {tower}")
        self.feature_blocks = list(feature_blocks)
        self.dense_mode = dense_mode
        self.mode_params = resolve_mode_params(mode_params)
        self.unlock_last_blocks = unlock_last_blocks
        self.patch_size = self.tower.patch_size
        self._feature_names = {b: f"res{k + 2}" for k, b in enumerate(self.feature_blocks)}
        self._out_features = list(self._feature_names.values()) + ["clip_dense"]
        self._out_feature_channels = {n: self.tower.width for n in self._feature_names.values()}
        with torch.no_grad():
            self.embed_dim = self.tower.head(torch.zeros(1, 1, self.tower.width)).shape[-1]
        self._out_feature_channels["clip_dense"] = self.embed_dim
        self._out_feature_strides = {n: self.patch_size for n in self._out_features}

        for p in self.parameters():
            p.requires_grad_(False)
        for blk in self.tower.blocks[depth - unlock_last_blocks:] if unlock_last_blocks else []:
            for p in blk.parameters():
                p.requires_grad_(True)
        unlock_by_patterns(self.tower.visual, unlock_patterns)
        self.train(False)

    @classmethod
    def from_config(cls, cfg, input_shape=None, visual: Optional[nn.Module] = None):
        if visual is None:
            visual, _ = load_clip_towers(cfg)
        return {
            "visual": visual,
            "feature_blocks": list(cfg.MODEL.CLIP.FEATURE_BLOCKS),
            "dense_mode": cfg.MODEL.CLIP.DENSE_MODE,
            "unlock_last_blocks": cfg.MODEL.CLIP.UNLOCK_LAST_BLOCKS,
            "mode_params": mode_params_from_config(cfg),
            "pos_embed_resize": cfg.MODEL.CLIP.POS_EMBED_RESIZE,
            "unlock_patterns": list(cfg.MODEL.CLIP.UNLOCK_PATTERNS),
            "model_name": cfg.MODEL.CLIP.MODEL_NAME,
        }

    def unlocked_blocks(self) -> List[nn.Module]:
        """The blocks with a trainable parameter (UNLOCK_LAST_BLOCKS, UNLOCK_PATTERNS)."""
        return [blk for blk in self.tower.blocks if any(p.requires_grad for p in blk.parameters())]

    def train(self, mode: bool = True):
        # Frozen parts stay in eval mode (patch dropout, norms); only unlocked blocks follow `mode`.
        super().train(False)
        for blk in self.unlocked_blocks():
            blk.train(mode)
        self.training = mode
        return self

    @property
    def size_divisibility(self) -> int:
        return self.patch_size

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad (bottom/right) to a multiple of the patch size; never crop."""
        p = self.patch_size
        h, w = x.shape[-2:]
        # the padded size written as a multiple of p (torch.export then knows that padding again is a no-op), with
        # non-negative operands only (ONNX integer division truncates towards zero, Python's floors)
        ph, pw = (h + p - 1) // p * p - h, (w + p - 1) // p * p - w
        if is_symbolic((ph, pw)):  # torch.export at any image size: the pad is in the graph (zero where aligned)
            return F.pad(x, (0, pw, 0, ph))
        return F.pad(x, (0, pw, 0, ph)) if ph or pw else x

    def _to_map(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        # (B, 1 + h*w, C) -> (B, C, h, w), dropping the class token
        return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, *grid)

    def low_precision_weights(self, device_type: str):
        """Context in which, under autocast, the frozen weights are their cached low-precision copies (cast once,
        not by every op on every forward); trainable ones keep autocast's cast, in the graph."""
        return frozen_weights_in_autocast_dtype(self.tower.visual, device_type, self.tower.matmul_weights())

    def forward_tokens(self, x: torch.Tensor, dense_mode: Optional[str] = None
                       ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, dict]:
        """Run the tower. Returns (multi-level feature maps, last-block tokens (B, 1 + h*w, C), context)."""
        mode = dense_mode or self.dense_mode
        get_dense_mode(mode, key="dense_mode")
        with self.low_precision_weights(x.device.type):
            x, ctx = self.tower.embed(self.pad(x))
            ctx["mode_params"] = self.mode_params
            feats = {}
            blocks = self.tower.blocks
            for i, blk in enumerate(blocks[:-1]):
                x = self.tower.run_block(blk, x, ctx)
                if i in self._feature_names:
                    feats[self._feature_names[i]] = self._to_map(x, ctx["grid"])
            if len(blocks) - 1 in self._feature_names:
                # the last block's own (attention) output is wanted as a feature as well
                full = self.tower.run_block(blocks[-1], x, ctx)
                feats[self._feature_names[len(blocks) - 1]] = self._to_map(full, ctx["grid"])
                last = full if get_dense_mode(mode).mixing == "attention" else self.tower.last_block(x, ctx, mode)
            else:
                last = self.tower.last_block(x, ctx, mode)
        return feats, last, ctx

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tower's final norm + projection to CLIP space, token-wise: (B, L, C) -> (B, L, D)."""
        with self.low_precision_weights(tokens.device.type):
            return self.tower.head(tokens)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats, last, ctx = self.forward_tokens(x)
        dense = F.normalize(self.head(last[:, 1:]), dim=-1)  # (B, h*w, D)
        feats["clip_dense"] = dense.transpose(1, 2).reshape(dense.shape[0], -1, *ctx["grid"])
        return feats

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """The (unnormalised) image embedding exactly as open_clip computes it: (B, 3, H, W) -> (B, D)."""
        _, last, _ = self.forward_tokens(x, dense_mode="attention")
        with self.low_precision_weights(x.device.type):
            return self.tower.pool(last)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """Channels and stride of every output. All of them are at the patch stride p (a ViT has one resolution):
        "res2".."res5" are named after the blocks' order, not after ResNet's strides 4..32 that Mask2Former-style
        heads assume; the pixel decoder resamples them (MODEL.MASK_SEG.PIXEL_DECODER.PYRAMID_SCALES)."""
        return {n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
                for n in self._out_features}
