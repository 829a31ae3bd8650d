"""CAT-Seg's cost aggregation head (Cho et al., CVPR 2024): a cost volume between CLIP patch embeddings and class
text embeddings, aggregated over space (per class) and over classes (per pixel), then upsampled to masks.

Our own implementation of the rules of the authors' code (github.com/KU-CVLAB/CAT-Seg, commit 6d3a188,
cat_seg/modeling/transformer/model.py). Every module of theirs is one module here with the same parameter shapes
and the same order of operations, so their checkpoints convert by renaming keys. The correspondence (authors' key
prefix under `sem_seg_head.predictor.transformer.` -> ours under `head.`):

    layers.{i}.swin_block.block_{1,2}.norm1 / norm2          -> layers.{i}.spatial.block_{1,2}.norm1 / norm2
    layers.{i}.swin_block.block_{1,2}.attn.{q,k,v,proj}       -> layers.{i}.spatial.block_{1,2}.attn.{q,k,v,proj}
    layers.{i}.swin_block.block_{1,2}.mlp.{fc1,fc2}           -> layers.{i}.spatial.block_{1,2}.mlp.{fc1,fc2}
    layers.{i}.swin_block.block_2.attn_mask (a buffer)        -> (none: the shift mask is recomputed; check equal)
    layers.{i}.swin_block.guidance_norm                       -> layers.{i}.spatial.guidance_norm
    layers.{i}.attention.attention.{q,k,v}                    -> layers.{i}.classes.attn.{q,k,v}
    layers.{i}.attention.MLP.{0,2}                            -> layers.{i}.classes.mlp.{0,2}
    layers.{i}.attention.norm{1,2}                            -> layers.{i}.classes.norm{1,2}
    layers.{i}.attention.padding_tokens / padding_guidance    -> layers.{i}.classes.padding_tokens / padding_guidance
    conv1                                                     -> cost_embed
    guidance_projection.0                                     -> appearance_proj.0
    text_guidance_projection.0                                -> text_proj.0
    decoder_guidance_projection.{j}.0                         -> decoder_guidance_proj.{j}.0
    decoder{j+1}.up                                           -> decoder.{j}.up
    decoder{j+1}.conv.double_conv.{0,1,3,4}                   -> decoder.{j}.conv.{0,1,3,4}
    head                                                      -> head

The two guidance upsamplers of the authors' meta-architecture (`upsample1`, `upsample2`) are
`CATSegSegmentor.guidance_upsample.{0,1}` (see ovseg/modeling/meta_arch/catseg.py).

Beyond the authors' code: the per-class work (cost embedding, spatial aggregation, decoder, and the per-class
parts of class aggregation) runs in chunks of `class_chunk` classes; the result does not depend on the chunk size.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_TYPES = ("linear", "full")
# the authors' additive mask value between tokens of different regions in a shifted window
_SHIFT_MASK_VALUE = -100.0


def _chunks(n: int, size: int) -> List[Tuple[int, int]]:
    size = n if size <= 0 else size
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _over_chunks(fn: Callable[[int, int], torch.Tensor], n: int, size: int, dim: int) -> torch.Tensor:
    """fn(start, end) for each chunk of `size` classes out of `n`, concatenated along `dim`; a single chunk is
    returned as it is (a cat of one tensor would copy it)."""
    parts = [fn(s, e) for s, e in _chunks(n, size)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def guided_linear(linear: nn.Linear, x: torch.Tensor, guidance: Optional[torch.Tensor]) -> torch.Tensor:
    """`linear` applied to [x, guidance] concatenated on the last axis, without building the concatenation: the
    guidance part is projected once per guidance row and broadcast over the rows of x that share it.

    x: (G * R, *rest, dim), guidance: (G, *rest, Cg) or None (then `linear` reads x alone); consecutive groups of R
    rows of x share one guidance row (R classes of one image, or R pixels of one image). -> (G * R, *rest, out)."""
    dim = x.shape[-1]
    if guidance is None and linear.in_features != dim:  # its guidance columns would be dropped silently
        raise ValueError(f"a linear layer of {linear.in_features} inputs guided by {linear.in_features - dim} "
                         f"channels got no guidance")
    out = F.linear(x, linear.weight[:, :dim], linear.bias)
    if guidance is None:
        return out
    g = F.linear(guidance, linear.weight[:, dim:])
    return (out.view(g.shape[0], -1, *out.shape[1:]) + g.unsqueeze(1)).view(out.shape)


def cost_volume(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every patch and every class under every prompt.

    Args:
        image: (B, D, h, w) patch embeddings.
        text: (B, T, P, D) class embeddings (T classes, P prompt templates).
    Returns:
        (B, P, T, h, w).
    """
    image = F.normalize(image, dim=1)
    text = F.normalize(text, dim=-1)
    return torch.einsum("bdhw,btpd->bpthw", image, text)


def shift_window_mask(grid: Tuple[int, int], window: int, shift: int, device=None) -> torch.Tensor:
    """Additive mask (num_windows, window^2, window^2) of a cyclically shifted window partition: 0 between tokens
    that were neighbours before the roll, -100 between tokens that the roll brought together (Swin's rule)."""
    h, w = grid

    def bands(n: int) -> torch.Tensor:  # band id of each row / column: [0, n-window), [n-window, n-shift), rest
        ids = torch.zeros(n, dtype=torch.long, device=device)
        ids[n - window:] = 1
        ids[n - shift:] = 2
        return ids

    region = (bands(h)[:, None] * 3 + bands(w)[None, :]).view(1, h, w, 1).float()  # (1, h, w, 1)
    region = partition_windows(region, window).squeeze(-1)  # (nW, window^2)
    same = region[:, :, None] == region[:, None, :]
    return torch.zeros(same.shape, device=device).masked_fill(~same, _SHIFT_MASK_VALUE)


def partition_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(N, h, w, C) -> (N * num_windows, window^2, C), windows in row-major order."""
    n, h, w, c = x.shape
    x = x.view(n, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def merge_windows(x: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `partition_windows`: (N * num_windows, window^2, C) -> (N, h, w, C)."""
    c = x.shape[-1]
    x = x.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


class WindowAttention(nn.Module):
    """Multi-head attention inside windows; queries and keys see the cost token and its appearance guidance,
    values the cost token only (no relative position bias, as the authors)."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (N, nW, L, dim) the tokens of each map by window; guidance: (G, nW, L, Cg) or None, one guidance map
        shared by N / G consecutive maps of x (the classes of one image); mask: (nW, L, L) additive or None ->
        (N, nW, L, dim)."""
        n, nw, length, _ = x.shape
        hd = self.dim // self.num_heads
        q, k, v = guided_linear(self.q, x, guidance), guided_linear(self.k, x, guidance), self.v(x)
        if mask is None:
            heads = lambda t: t.view(n * nw, length, self.num_heads, hd).transpose(1, 2)  # noqa: E731
            out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2)
        else:
            # 4-D, windows and heads on one axis so that the (nW, L, L) mask broadcasts over the maps: a 5-D input
            # would fall back to the unfused kernel that builds every window's attention matrix
            def heads(t):
                return t.view(n, nw, length, self.num_heads, hd).transpose(2, 3).reshape(n, -1, length, hd)
            m = mask.to(q.dtype)[:, None].expand(-1, self.num_heads, -1, -1).reshape(1, -1, length, length)
            out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=m)
            out = out.view(n, nw, self.num_heads, length, hd).transpose(2, 3)
        return self.proj(out.reshape(n, nw, length, self.dim))


class MLP(nn.Module):
    """timm's Mlp layout (fc1, GELU, fc2)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class GuidedWindowBlock(nn.Module):
    """A Swin block (window or shifted-window attention + MLP, pre-norm) whose attention is guided by appearance
    features concatenated to its queries and keys."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, window: int, shifted: bool,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.window, self.shifted = window, shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, guidance_dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def geometry(self, grid: Tuple[int, int]) -> Tuple[int, int]:
        """(window, shift) on a grid: a window covering the grid becomes the grid, unshifted (the authors' rule)."""
        window, shift = self.window, (self.window // 2 if self.shifted else 0)
        if min(grid) <= window:
            window, shift = min(grid), 0
        if grid[0] % window or grid[1] % window:
            raise ValueError(f"CAT-Seg spatial aggregation: the feature grid {grid} is not a multiple of the window "
                             f"size {window} (MODEL.CATSEG.WINDOW_SIZE; the grid is MODEL.CATSEG.CLIP_RESOLUTION / "
                             "patch size)")
        return window, shift

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor], grid: Tuple[int, int]) -> torch.Tensor:
        """x: (N, h*w, dim); guidance: (G, h*w, Cg) or None, shared by N / G consecutive maps of x -> (N, h*w, dim)."""
        h, w = grid
        n, _, c = x.shape
        window, shift = self.geometry(grid)
        y = self.norm1(x).view(n, h, w, c)
        g = guidance.view(guidance.shape[0], h, w, -1) if guidance is not None else None
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
            g = torch.roll(g, shifts=(-shift, -shift), dims=(1, 2)) if g is not None else None
        mask = shift_window_mask(grid, window, shift, x.device) if shift else None
        by_window = lambda t: partition_windows(t, window).view(t.shape[0], -1, window * window, t.shape[-1])  # noqa: E731
        y = self.attn(by_window(y), None if g is None else by_window(g), mask)  # (N, nW, window^2, dim)
        y = merge_windows(y.view(-1, window * window, c), window, h, w)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + y.reshape(n, h * w, c)
        return x + self.mlp(self.norm2(x))


class SpatialAggregation(nn.Module):
    """Per class: a window block then a shifted-window block over the cost map, guided by the (normed) projected
    CLIP image features. Classes are independent here."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, window: int):
        super().__init__()
        self.block_1 = GuidedWindowBlock(dim, guidance_dim, num_heads, window, shifted=False)
        self.block_2 = GuidedWindowBlock(dim, guidance_dim, num_heads, window, shifted=True)
        self.guidance_norm = nn.LayerNorm(guidance_dim) if guidance_dim > 0 else None

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor]) -> torch.Tensor:
        """x: (B, C, T, h, w) cost embedding; guidance: (B, Cg, h, w) or None -> (B, C, T, h, w)."""
        b, c, t, h, w = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)  # (B*T, h*w, C)
        if guidance is not None:
            guidance = self.guidance_norm(guidance.flatten(2).transpose(1, 2))  # (B, h*w, Cg), for B*T maps
        tokens = self.block_1(tokens, guidance, (h, w))
        tokens = self.block_2(tokens, guidance, (h, w))
        return tokens.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Kernelised attention with feature map elu + 1 (Katharopoulos et al. 2020), as the authors compute it
    (values scaled by 1 / length inside, for fp16 range). q, k, v: (N, L, heads, d) -> (N, L, heads, d)."""
    q, k = F.elu(q) + 1, F.elu(k) + 1
    length = v.shape[1]
    kv = torch.einsum("nshd,nshv->nhdv", k, v / length)
    z = 1.0 / (torch.einsum("nlhd,nhd->nlh", q, k.sum(dim=1)) + eps)
    return torch.einsum("nlhd,nhdv,nlh->nlhv", q, kv, z) * length


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention. q, k, v: (N, L, heads, d) -> (N, L, heads, d)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class ClassAttention(nn.Module):
    """Attention among the classes at one pixel; queries and keys see the class's text guidance too."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, attention_type: str):
        super().__init__()
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"MODEL.CATSEG.ATTENTION_TYPE={attention_type!r}; use one of {list(ATTENTION_TYPES)}")
        self.num_heads = num_heads
        self.attend = linear_attention if attention_type == "linear" else full_attention
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor]) -> torch.Tensor:
        """x: (N, T, C); guidance: (G, T, Cg) or None, shared by N / G consecutive rows of x (the pixels of one
        image) -> (N, T, C)."""
        n, t, _ = x.shape
        q, k, v = (p.view(n, t, self.num_heads, -1)
                   for p in (guided_linear(self.q, x, guidance), guided_linear(self.k, x, guidance), self.v(x)))
        return self.attend(q, k, v).reshape(n, t, -1)


class ClassAggregation(nn.Module):
    """Per pixel of an average-pooled grid: a transformer layer over the class axis, guided by the projected text
    embeddings; the result is upsampled back and added to the input. The classes are padded with learned tokens
    to `pad_len` (the authors' fixed class-token length; 0 = off). Equivariant to permutations of the classes."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, attention_type: str,
                 pooling_size: Optional[Sequence[int]], pad_len: int,
                 test_pooling_size: Optional[Sequence[int]] = None):
        super().__init__()
        self.pool_size = tuple(pooling_size) if pooling_size else None
        # the authors test without pooling (eval.sh: POOLING_SIZES [1, 1]); None = as in training
        self.test_pool_size = tuple(test_pooling_size) if test_pooling_size else self.pool_size
        self.attn = ClassAttention(dim, guidance_dim, num_heads, attention_type)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 4), nn.ReLU(), nn.Linear(dim * 4, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.pad_len = pad_len
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, dim)) if pad_len > 0 else None
        self.padding_guidance = nn.Parameter(torch.zeros(1, 1, guidance_dim)) if pad_len > 0 and guidance_dim else None

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        size = self.pool_size if self.training else self.test_pool_size
        if size is None or tuple(size) == (1, 1):
            return x
        y = F.avg_pool2d(x.transpose(1, 2).reshape(b * t, c, h, w), size)
        return y.view(b, t, c, *y.shape[-2:]).transpose(1, 2)

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor], class_chunk: int = 0) -> torch.Tensor:
        """x: (B, C, T, h, w); guidance: (B, T, Cg) or None -> (B, C, T, h, w)."""
        b, c, t, h, w = x.shape
        pooled = _over_chunks(lambda s, e: self._pool(x[:, :, s:e]), t, class_chunk, dim=2)
        hp, wp = pooled.shape[-2:]
        pad = max(self.pad_len - t, 0) if self.padding_tokens is not None else 0
        # each pixel's class tokens then the padding tokens, written in one copy (in the activations' dtype: under
        # bf16 autocast a cat with the fp32 parameter would promote every class token to fp32)
        tokens = pooled.new_empty((b, hp, wp, t + pad, c))
        tokens[:, :, :, :t] = pooled.permute(0, 3, 4, 2, 1)
        if self.padding_tokens is not None:  # also when pad == 0: the tokens stay in the graph (DDP: no unused params)
            tokens[:, :, :, t:] = self.padding_tokens.to(pooled.dtype)
            if guidance is not None and self.padding_guidance is not None:
                guidance = torch.cat([guidance, self.padding_guidance.to(guidance.dtype).expand(b, pad, -1)], dim=1)
        tokens = tokens.view(b * hp * wp, t + pad, c)  # (B*hp*wp, T', C); guidance (B, T', Cg) per image
        tokens = tokens + self.attn(self.norm1(tokens), guidance)
        tokens = tokens + self.mlp(self.norm2(tokens))
        tokens = tokens.view(b, hp, wp, t + pad, c)[:, :, :, :t]  # (B, hp, wp, T, C)
        if (hp, wp) == (h, w):  # not pooled (the authors' test setting): the upsampling would be the identity
            return x + tokens.permute(0, 4, 3, 1, 2)

        def upsampled(s: int, e: int) -> torch.Tensor:
            up = F.interpolate(tokens[:, :, :, s:e].permute(0, 3, 4, 1, 2).reshape(-1, c, hp, wp), size=(h, w),
                               mode="bilinear", align_corners=True)
            return x[:, :, s:e] + up.view(b, e - s, c, h, w).transpose(1, 2)
        return _over_chunks(upsampled, t, class_chunk, dim=2)


class AggregationLayer(nn.Module):
    """Spatial aggregation (per class) then class aggregation (per pixel)."""

    def __init__(self, dim: int, text_guidance_dim: int, appearance_guidance_dim: int, num_heads: int,
                 pooling_size: Optional[Sequence[int]], window: int, attention_type: str, pad_len: int,
                 test_pooling_size: Optional[Sequence[int]] = None):
        super().__init__()
        self.spatial = SpatialAggregation(dim, appearance_guidance_dim, num_heads, window)
        self.classes = ClassAggregation(dim, text_guidance_dim, num_heads, attention_type, pooling_size, pad_len,
                                        test_pooling_size)

    def forward(self, x: torch.Tensor, appearance: Optional[torch.Tensor], text: Optional[torch.Tensor],
                class_chunk: int = 0) -> torch.Tensor:
        """x: (B, C, T, h, w); appearance: (B, Cg, h, w); text: (B, T, Cg) -> (B, C, T, h, w)."""
        x = _over_chunks(lambda s, e: self.spatial(x[:, :, s:e], appearance), x.shape[2], class_chunk, dim=2)
        return self.classes(x, text, class_chunk)


class UpBlock(nn.Module):
    """x2 transposed-conv upsampling, concatenation of a guidance map, two 3x3 conv + GroupNorm + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, guidance_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels - guidance_channels, kernel_size=2, stride=2)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(out_channels // 16, out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(out_channels // 16, out_channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor]) -> torch.Tensor:
        """x: (B*T, C, h, w); guidance: (B, Cg, 2h, 2w) -> (B*T, C_out, 2h, 2w)."""
        x = self.up(x)
        if guidance is None:
            return self.conv(x)
        # conv([x, g]) = conv_x(x) + conv_g(g): the guidance part once per image, broadcast over its classes,
        # instead of a copy of the guidance per class concatenated to x
        first, c = self.conv[0], x.shape[1]
        y = F.conv2d(x, first.weight[:, :c], padding=first.padding)
        g = F.conv2d(guidance, first.weight[:, c:], padding=first.padding)  # (B, C_out, 2h, 2w)
        y = (y.view(g.shape[0], -1, *y.shape[1:]) + g.unsqueeze(1)).view(y.shape)
        return self.conv[1:](y)


class CostAggregator(nn.Module):
    """The CAT-Seg head: cost volume -> embedding -> `num_layers` x (spatial, class aggregation) -> upsampling
    decoder guided by intermediate CLIP features -> one logit map per class at 4x the feature grid."""

    def __init__(self, *, text_dim: int, appearance_dim: int, text_guidance_proj_dim: int = 128,
                 appearance_guidance_proj_dim: int = 128, decoder_dims: Sequence[int] = (64, 32),
                 decoder_guidance_dims: Sequence[int] = (256, 128),
                 decoder_guidance_proj_dims: Sequence[int] = (32, 16), num_layers: int = 2, num_heads: int = 4,
                 hidden_dim: int = 128, pooling_size: Optional[Sequence[int]] = (2, 2), window_size: int = 12,
                 attention_type: str = "linear", num_prompts: int = 1, pad_len: int = 256, class_chunk: int = 0,
                 test_pooling_size: Optional[Sequence[int]] = None, reject_topk: int = 0):
        """
        Args:
            text_dim, appearance_dim: CLIP's embedding dim (text embeddings, final patch embeddings).
            text_guidance_proj_dim, appearance_guidance_proj_dim: their projected dims (0 = no guidance).
            decoder_dims: channels after each of the two upsampling blocks.
            decoder_guidance_dims / _proj_dims: channels of the two intermediate-layer guidance maps, before and
                after their 3x3 projection.
            num_layers, num_heads, hidden_dim: aggregation depth, heads and cost-embedding channels.
            pooling_size: average pooling before class aggregation (None = none).
            test_pooling_size: the same at test time (None = `pooling_size`; the authors test with (1, 1)).
            window_size: spatial aggregation's window (shifted by half in every second block).
            attention_type: "linear" or "full" attention over classes.
            num_prompts: prompt templates P (channels of the cost volume).
            pad_len: class-token length of class aggregation: fewer classes are padded with learned tokens, more
                are cut to the `pad_len` with the highest CLIP similarity anywhere (the others get logit -100).
                0 = off.
            class_chunk: classes per chunk of the per-class work (0 = all at once; results do not depend on it).
            reject_topk: SED-style early rejection at test time (0 = off): see `early_rejection`.
        """
        super().__init__()
        if len(decoder_dims) != 2 or len(decoder_guidance_dims) != 2 or len(decoder_guidance_proj_dims) != 2:
            raise ValueError("CAT-Seg's decoder has two upsampling blocks: DECODER_DIMS, DECODER_GUIDANCE_DIMS and "
                             "DECODER_GUIDANCE_PROJ_DIMS need two entries each")
        self.pad_len, self.class_chunk = pad_len, class_chunk
        if reject_topk < 0:
            raise ValueError(f"MODEL.CATSEG.SED_TOPK={reject_topk} must be >= 0 (0 = no early rejection)")
        self.reject_topk = reject_topk
        self.layers = nn.ModuleList([
            AggregationLayer(hidden_dim, text_guidance_proj_dim, appearance_guidance_proj_dim, num_heads,
                             pooling_size, window_size, attention_type, pad_len, test_pooling_size)
            for _ in range(num_layers)])
        self.cost_embed = nn.Conv2d(num_prompts, hidden_dim, kernel_size=7, padding=3)
        self.appearance_proj = nn.Sequential(
            nn.Conv2d(appearance_dim, appearance_guidance_proj_dim, kernel_size=3, padding=1), nn.ReLU()
        ) if appearance_guidance_proj_dim > 0 else None
        self.text_proj = nn.Sequential(
            nn.Linear(text_dim, text_guidance_proj_dim), nn.ReLU()) if text_guidance_proj_dim > 0 else None
        self.decoder_guidance_proj = nn.ModuleList([
            nn.Sequential(nn.Conv2d(d, p, kernel_size=3, padding=1), nn.ReLU())
            for d, p in zip(decoder_guidance_dims, decoder_guidance_proj_dims)])
        ins = (hidden_dim, decoder_dims[0])
        self.decoder = nn.ModuleList([UpBlock(i, o, g) for i, o, g in zip(ins, decoder_dims,
                                                                          decoder_guidance_proj_dims)])
        self.head = nn.Conv2d(decoder_dims[1], 1, kernel_size=3, padding=1)

    def select_classes(self, cost: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, pad_len) indices of the classes kept when there are more than `pad_len`: those with the highest
        similarity anywhere in the image under any prompt; None when all are kept."""
        t = cost.shape[2]
        if self.pad_len <= 0 or t <= self.pad_len:
            return None
        best = cost.transpose(1, 2).flatten(2).amax(dim=-1)  # (B, T)
        return best.topk(self.pad_len, dim=-1).indices

    def early_rejection(self, cost: torch.Tensor) -> torch.Tensor:
        """SED's category early rejection (Xie et al., CVPR 2024; github.com/xb534/SED, sed/modeling/transformer/
        model.py `get_valid_idx_from_mask`): a class survives when it is among the `reject_topk` best classes of at
        least one cell of a coarse score map. SED scores with trained auxiliary heads; CAT-Seg has none, so the
        score here is the CLIP cost itself (max over prompts), read before every per-class stage.

        (B, P, T, h, w) cost -> (B, T) bool, True = kept."""
        score = cost.amax(dim=1)  # (B, T, h, w)
        k = min(self.reject_topk, score.shape[1])
        top = score.topk(k, dim=1).indices  # (B, k, h, w)
        keep = torch.zeros(score.shape[:2], dtype=torch.bool, device=cost.device)
        return keep.scatter_(1, top.flatten(1), True)

    def embed_cost(self, cost: torch.Tensor) -> torch.Tensor:
        """(B, P, T, h, w) -> (B, hidden, T, h, w), the same 7x7 conv for every class."""
        b, p, t, h, w = cost.shape

        def embedded(s: int, e: int) -> torch.Tensor:
            y = self.cost_embed(cost[:, :, s:e].transpose(1, 2).reshape(b * (e - s), p, h, w))
            return y.view(b, e - s, -1, h, w).transpose(1, 2)
        return _over_chunks(embedded, t, self.class_chunk, dim=2)

    def decode(self, x: torch.Tensor, guidance: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """(B, hidden, T, h, w) -> (B, T, 4h, 4w) logits."""
        b, c, t, h, w = x.shape

        def decoded(s: int, e: int) -> torch.Tensor:
            y = x[:, :, s:e].transpose(1, 2).reshape(b * (e - s), c, h, w)
            for block, g in zip(self.decoder, guidance):
                y = block(y, g)
            return self.head(y).view(b, e - s, *y.shape[-2:])
        return _over_chunks(decoded, t, self.class_chunk, dim=1)

    def forward(self, image: torch.Tensor, text: torch.Tensor, appearance: torch.Tensor,
                decoder_guidance: Sequence[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            image: (B, D, h, w) final CLIP patch embeddings (not normalised; also the appearance guidance).
            text: (B, T, P, D) class embeddings per prompt template.
            appearance: (B, D, h, w) the map projected as spatial guidance (the authors pass `image` itself).
            decoder_guidance: two maps (B, decoder_guidance_dims[j], 2^(j+1) h, 2^(j+1) w).
        Returns:
            (B, T, 4h, 4w) logits; with `reject_topk` at test time, rejected classes get -100 and the kept ones
            what a run on the kept classes alone gives.
        """
        if self.reject_topk and not self.training:
            keep = self.early_rejection(cost_volume(image, text))  # (B, T)
            if not bool(keep.all()):  # one host read: the kept sets differ per image
                out = []
                for i in range(image.shape[0]):
                    idx = keep[i].nonzero().squeeze(1)
                    sub = self._aggregate(image[i:i + 1], text[i:i + 1, idx], appearance[i:i + 1],
                                          [g[i:i + 1] for g in decoder_guidance])  # (1, kept, 4h, 4w)
                    full = sub.new_full((1, text.shape[1], *sub.shape[-2:]), -100.0)
                    full[:, idx] = sub
                    out.append(full)
                return torch.cat(out)
        return self._aggregate(image, text, appearance, decoder_guidance)

    def _aggregate(self, image: torch.Tensor, text: torch.Tensor, appearance: torch.Tensor,
                   decoder_guidance: Sequence[torch.Tensor]) -> torch.Tensor:
        cost = cost_volume(image, text)  # (B, P, T, h, w)
        kept = self.select_classes(cost)
        num_classes = text.shape[1]
        if kept is not None:
            text = torch.gather(F.normalize(text, dim=-1), 1, kept[:, :, None, None].expand(-1, -1, *text.shape[2:]))
            cost = torch.gather(cost, 2, kept[:, None, :, None, None].expand(-1, cost.shape[1], -1, *cost.shape[-2:]))
        x = self.embed_cost(cost)
        app = self.appearance_proj(appearance) if self.appearance_proj is not None else None
        dec = [proj(g) for proj, g in zip(self.decoder_guidance_proj, decoder_guidance)]
        txt = None
        if self.text_proj is not None:
            txt = self.text_proj(F.normalize(text.mean(dim=2), dim=-1))  # (B, T, Cg): prompts averaged
        for layer in self.layers:
            x = layer(x, app, txt, self.class_chunk)
        logits = self.decode(x, dec)
        if kept is not None:
            full = logits.new_full((logits.shape[0], num_classes, *logits.shape[-2:]), -100.0)
            logits = full.scatter(1, kept[:, :, None, None].expand(-1, -1, *logits.shape[-2:]), logits)
        return logits
