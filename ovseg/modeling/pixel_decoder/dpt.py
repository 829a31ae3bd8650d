"""DPT's decoder (Ranftl et al., ICCV 2021) as LSeg uses it: reassemble four ViT block outputs at four scales, then
fuse them coarse to fine with residual convolution units, each fusion doubling the resolution.

Layout follows the DPT / LSeg code (github.com/isl-org/lang-seg, modules/models/lseg_vit.py `_make_vit_b16_backbone`,
lseg_blocks.py `_make_scratch`, `FeatureFusionBlock_custom`, commit bb00b219f82dc1a18a01f9b0b647bae1d41f3aeb):
  reassemble l: 1x1 conv C_vit -> channels[l], then resample the patch grid by scales[l] (x4 and x2: transposed
      convolutions with kernel = stride = scale; x1: none; x0.5: 3x3 conv, stride 2), then a 3x3 conv (no bias)
      to `features` channels;
  fusion (coarsest first): y = x + RCU(skip); y = RCU(y); bilinear x2 (align_corners=True); 1x1 conv.
The class-token readout is "ignore" here: our encoder exports patch tokens only (LSeg's code uses "project").
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import nn


def reassemble_resampler(channels: int, scale: float) -> nn.Module:
    """DPT's per-level resampling of a (B, C, h, w) patch-grid map by `scale` (4, 2, 1 or 0.5 in DPT; any power of
    two here: up by one transposed conv with kernel = stride = scale, down by stride-2 3x3 convs)."""
    steps = math.log2(scale) if scale > 0 else float("nan")
    if steps != round(steps):
        raise ValueError(f"MODEL.LSEG.REASSEMBLE_SCALES: {scale} is not a power of two")
    steps = int(round(steps))
    if steps > 0:
        k = 2 ** steps
        return nn.ConvTranspose2d(channels, channels, kernel_size=k, stride=k)
    if steps == 0:
        return nn.Identity()
    return nn.Sequential(*(nn.Conv2d(channels, channels, 3, stride=2, padding=1) for _ in range(-steps)))


class ResidualConvUnit(nn.Module):
    """x + conv(act(bn(conv(act(x))))): DPT's residual unit with batch norm (LSeg builds it with BN on; the
    convolutions then have no bias)."""

    def __init__(self, channels: int, use_bn: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=not use_bn)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=not use_bn)
        self.bn1 = nn.BatchNorm2d(channels) if use_bn else nn.Identity()
        self.bn2 = nn.BatchNorm2d(channels) if use_bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.conv1(F.relu(x)))
        y = self.bn2(self.conv2(F.relu(y)))
        return x + y


class FusionBlock(nn.Module):
    """One DPT fusion step: add the residual-refined skip, refine, upsample, project (1x1). The coarsest step has
    no skip, and no skip unit (DPT builds one it never uses; an unused parameter would stall DDP)."""

    def __init__(self, channels: int, use_bn: bool = True, with_skip: bool = True):
        super().__init__()
        self.skip_unit = ResidualConvUnit(channels, use_bn) if with_skip else None
        self.unit = ResidualConvUnit(channels, use_bn)
        self.out_conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: Sequence[int]) -> torch.Tensor:
        """x: (B, F, h, w); skip: (B, F, h, w) or None; returns (B, F, *size). `size` is 2x (h, w) in DPT, whose
        inputs are multiples of 32; here it is the next level's grid, so that odd patch grids fuse too."""
        if (skip is None) != (self.skip_unit is None):
            raise ValueError("a fusion step with a skip unit needs a skip input, and only it")
        if skip is not None:
            x = x + self.skip_unit(skip)
        x = F.interpolate(self.unit(x), size=tuple(size), mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTDecoder(nn.Module):
    """Four single-stride ViT feature maps -> one (B, features, 2 s h, 2 s w) map, s = the finest scale.

    With DPT's scales (4, 2, 1, 0.5) and a patch size p the output stride is p / 8 (2 pixels for p = 16).
    """

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, in_features: Sequence[str], channels: Sequence[int],
                 scales: Sequence[float], features: int, use_bn: bool = True):
        """
        Args:
            input_shape: the backbone's output shapes.
            in_features: backbone features to reassemble, finest level first (DPT: 4).
            channels: channels of each reassembled level before the 3x3 projection (DPT-Base 96, 192, 384, 768;
                LSeg ViT-L/16 256, 512, 1024, 1024).
            scales: resampling factor of each level relative to the patch grid, strictly decreasing.
            features: channels of the fusion path (LSeg's `features`, 256).
            use_bn: batch norm in the residual units (LSegNet turns it on).
        """
        super().__init__()
        if not (len(in_features) == len(channels) == len(scales)) or len(scales) < 2:
            raise ValueError(f"MODEL.LSEG.IN_FEATURES {list(in_features)}, REASSEMBLE_CHANNELS {list(channels)} and "
                             f"REASSEMBLE_SCALES {list(scales)} need one entry per level, at least 2 levels")
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise ValueError(f"MODEL.LSEG.IN_FEATURES {missing} are not backbone outputs {sorted(input_shape)}")
        if list(scales) != sorted(scales, reverse=True) or len(set(scales)) != len(scales):
            raise ValueError(f"MODEL.LSEG.REASSEMBLE_SCALES {list(scales)} must be strictly decreasing (finest first)")
        self.in_features = list(in_features)
        self.scales = [float(s) for s in scales]
        self.features = features
        self.reassemble = nn.ModuleList(
            nn.Sequential(nn.Conv2d(input_shape[f].channels, c, 1), reassemble_resampler(c, s),
                          nn.Conv2d(c, features, 3, padding=1, bias=False))
            for f, c, s in zip(in_features, channels, scales)
        )
        # fusion[l] fuses level l into the path; the coarsest level starts it
        self.fusion = nn.ModuleList(FusionBlock(features, use_bn, with_skip=i < len(scales) - 1)
                                    for i in range(len(scales)))
        stride = input_shape[in_features[0]].stride / self.scales[0]
        self.output_stride = stride / 2

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ls = cfg.MODEL.LSEG
        return {
            "input_shape": input_shape,
            "in_features": list(ls.IN_FEATURES),
            "channels": list(ls.REASSEMBLE_CHANNELS),
            "scales": list(ls.REASSEMBLE_SCALES),
            "features": ls.FEATURES,
            "use_bn": ls.USE_BN,
        }

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """features: backbone outputs, each (B, C_vit, h, w) on the patch grid.
        Returns (B, features, H_0 * 2, W_0 * 2), (H_0, W_0) the finest reassembled level's size."""
        levels: List[torch.Tensor] = [r(features[f]) for f, r in zip(self.in_features, self.reassemble)]
        x = None
        for i in reversed(range(len(levels))):  # coarsest first
            if x is None:
                x, skip = levels[i], None
            else:
                skip = levels[i]
            size = levels[i - 1].shape[-2:] if i else [2 * n for n in levels[0].shape[-2:]]
            x = self.fusion[i](x, skip, size)
        return x
