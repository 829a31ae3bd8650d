"""Pixel decoder for a plain ViT: a simple feature pyramid (ViTDet-style resampling of single-stride block
outputs) refined by a transformer encoder over the coarse levels and a top-down FPN to the mask features.

Everything is stock PyTorch (no deformable attention kernels), so it runs on any device.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.layers.batch_norm import LayerNorm as ChannelLayerNorm
from torch import nn

from ..position_encoding import sine_position_encoding
from .build import PIXEL_DECODER_REGISTRY


def make_norm(kind: str, channels: int) -> nn.Module:
    """Channel-first normalisation by name: "GN" (up to 32 groups of at least 2 channels), "LN", or ""."""
    if kind == "GN":
        # one-channel groups would normalise a 1x1 map to nothing (and torch refuses it in training)
        return nn.GroupNorm(math.gcd(32, max(channels // 2, 1)), channels)
    if kind == "LN":
        return ChannelLayerNorm(channels)
    if kind in ("", "none"):
        return nn.Identity()
    raise ValueError(f"MODEL.MASK_SEG.PIXEL_DECODER.NORM={kind!r}; use 'GN', 'LN' or ''")


def resampler(channels: int, scale: float, norm: str) -> Tuple[nn.Module, int]:
    """Resample a (B, C, h, w) map by a power-of-two `scale`; returns the module and its output channels.

    Up: stride-2 transposed convolutions halving the channels each time (ViTDet's simple pyramid); down:
    2x2 max pooling (ceil mode, so no row or column of the patch grid is dropped).
    """
    steps = math.log2(scale)
    if scale <= 0 or steps != round(steps):
        raise ValueError(f"MODEL.MASK_SEG.PIXEL_DECODER.PYRAMID_SCALES: {scale} is not a power of two")
    steps = int(round(steps))
    layers: List[nn.Module] = []
    c = channels
    for i in range(steps):
        if i:
            layers += [make_norm(norm, c), nn.GELU()]
        layers.append(nn.ConvTranspose2d(c, max(c // 2, 1), kernel_size=2, stride=2))
        c = max(c // 2, 1)
    for _ in range(-steps):
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
    return (nn.Sequential(*layers) if layers else nn.Identity()), c


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer whose positional encoding enters the queries and keys only
    (the values carry content, as in DETR)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = x + pos  # (B, L, C)
        x = self.norm1(x + self.dropout(self.attn(q, q, x, need_weights=False)[0]))
        return self.norm2(x + self.dropout(self.ffn(x)))


@PIXEL_DECODER_REGISTRY.register()
class ViTPyramidPixelDecoder(nn.Module):
    """Single-stride ViT features -> pyramid -> transformer encoder (coarse levels) -> FPN -> mask features.

    Level l takes backbone feature `in_features[l]` (B, C_vit, h, w) and resamples it by `scales[l]`
    (finest first). The `transformer_levels` coarsest levels attend to each other jointly; the finer ones
    are fused top-down, FPN-style. The finest level becomes the mask features.
    """

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, in_features: Sequence[str], scales: Sequence[float],
                 conv_dim: int, mask_dim: int, norm: str = "GN", transformer_levels: int = 2,
                 transformer_layers: int = 6, transformer_heads: int = 8, transformer_ffn_dim: int = 1024,
                 dropout: float = 0.0):
        """
        Args:
            input_shape: the backbone's output shapes.
            in_features: backbone features to use, finest level first.
            scales: resampling factor per level relative to the backbone's grid (powers of two, decreasing).
            conv_dim, mask_dim: channels of the pyramid levels and of the mask features.
            norm: normalisation of the convolutions ("GN", "LN", "").
            transformer_levels: number of coarsest levels refined by the transformer encoder (0 = none).
            transformer_layers, transformer_heads, transformer_ffn_dim, dropout: that encoder's shape.
        """
        super().__init__()
        if len(in_features) != len(scales) or len(scales) < 2:
            raise ValueError(f"PIXEL_DECODER.IN_FEATURES {list(in_features)} and PYRAMID_SCALES {list(scales)} "
                             "need the same length, at least 2")
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise ValueError(f"PIXEL_DECODER.IN_FEATURES {missing} are not backbone outputs {sorted(input_shape)}")
        if list(scales) != sorted(scales, reverse=True) or len(set(scales)) != len(scales):
            raise ValueError(f"PIXEL_DECODER.PYRAMID_SCALES {list(scales)} must be strictly decreasing (finest first)")
        if not 0 <= transformer_levels < len(scales):
            raise ValueError(f"PIXEL_DECODER.TRANSFORMER_LEVELS={transformer_levels}: the finest level is the mask "
                             f"level, so at most {len(scales) - 1} of {len(scales)} levels")
        if conv_dim % 4:
            raise ValueError(f"PIXEL_DECODER.CONV_DIM={conv_dim} must be divisible by 4 (positional encoding)")
        self.in_features = list(in_features)
        self.scales = [float(s) for s in scales]
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim
        self.num_transformer_levels = transformer_levels
        stride = {f: input_shape[f].stride for f in in_features}
        self.strides = [stride[f] / s for f, s in zip(in_features, scales)]  # input pixels per cell, per level

        self.resample = nn.ModuleList()
        self.lateral = nn.ModuleList()
        for f, s in zip(in_features, scales):
            module, c = resampler(input_shape[f].channels, s, norm)
            self.resample.append(module)
            self.lateral.append(Conv2d(c, conv_dim, kernel_size=1, bias=not norm, norm=make_norm(norm, conv_dim)))
        n_fpn = len(scales) - transformer_levels  # levels fused top-down (the finer ones)
        # the coarsest FPN input has no coarser neighbour when no level is in the transformer
        self.output = nn.ModuleList(
            Conv2d(conv_dim, conv_dim, kernel_size=3, padding=1, bias=not norm, norm=make_norm(norm, conv_dim),
                   activation=F.relu) for _ in range(n_fpn)
        )
        for conv in [*self.lateral, *self.output]:
            weight_init.c2_xavier_fill(conv)
        if transformer_levels:
            self.level_embed = nn.Parameter(torch.zeros(transformer_levels, conv_dim))
            nn.init.normal_(self.level_embed, std=0.02)
            self.encoder = nn.ModuleList(
                EncoderLayer(conv_dim, transformer_heads, transformer_ffn_dim, dropout)
                for _ in range(transformer_layers)
            )
        self.mask_proj = Conv2d(conv_dim, mask_dim, kernel_size=1)
        weight_init.c2_xavier_fill(self.mask_proj)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        pd = cfg.MODEL.MASK_SEG.PIXEL_DECODER
        return {
            "input_shape": input_shape,
            "in_features": list(pd.IN_FEATURES),
            "scales": list(pd.PYRAMID_SCALES),
            "conv_dim": pd.CONV_DIM,
            "mask_dim": pd.MASK_DIM,
            "norm": pd.NORM,
            "transformer_levels": pd.TRANSFORMER_LEVELS,
            "transformer_layers": pd.TRANSFORMER_LAYERS,
            "transformer_heads": pd.TRANSFORMER_HEADS,
            "transformer_ffn_dim": pd.TRANSFORMER_FFN_DIM,
            "dropout": pd.DROPOUT,
        }

    def encode(self, levels: List[torch.Tensor]) -> List[torch.Tensor]:
        """Joint self-attention over the tokens of all given levels; returns them in the same shapes."""
        tokens, pos, shapes = [], [], []
        for i, x in enumerate(levels):
            b, c, h, w = x.shape
            shapes.append((h, w))
            tokens.append(x.flatten(2).transpose(1, 2))  # (B, h*w, C)
            p = sine_position_encoding(h, w, c, x.device, x.dtype).flatten(1).t()  # (h*w, C)
            pos.append(p + self.level_embed[i].to(x.dtype))
        x = torch.cat(tokens, dim=1)  # (B, sum h*w, C)
        p = torch.cat(pos, dim=0)[None]
        for layer in self.encoder:
            x = layer(x, p)
        out, start = [], 0
        for h, w in shapes:
            out.append(x[:, start:start + h * w].transpose(1, 2).reshape(x.shape[0], -1, h, w))
            start += h * w
        return out

    def forward(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """
        Args:
            features: backbone outputs, each (B, C_vit, h, w) at the backbone's stride.
        Returns:
            mask_features: (B, mask_dim, h * scales[0], w * scales[0]);
            multi_scale: the other levels, (B, conv_dim, h_l, w_l), coarsest first.
        """
        # channels-last: the ViT's token maps already are, and the convolutions run faster that way on CPU
        levels = [lat(res(features[f].contiguous(memory_format=torch.channels_last)))
                  for f, res, lat in zip(self.in_features, self.resample, self.lateral)]
        n_fpn = len(levels) - self.num_transformer_levels
        coarse = self.encode(levels[n_fpn:]) if self.num_transformer_levels else []
        outs = list(reversed(coarse))  # coarsest first
        for i in reversed(range(n_fpn)):
            x = levels[i]
            if outs:
                x = x + F.interpolate(outs[-1], size=x.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(self.output[i](x))
        mask_features = self.mask_proj(outs[-1])
        return mask_features, outs[:-1]
