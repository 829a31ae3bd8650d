"""Pixel-adaptive mask refinement (PAMR; Araslanov & Roth, "Single-Stage Semantic Segmentation from Image
Labels", CVPR 2020), in plain PyTorch.

Each iteration replaces every pixel's class scores by an average of its 8 neighbours at each dilation, weighted
by how similar their colours are to its own. The weights depend on the image only, so they are computed once
(`affinity`) and applied to as many classes at a time as memory allows (`propagate`): the segmentor refines
847 classes in chunks without holding 8 * len(dilations) shifted copies of the logits.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F


def neighbour_offsets(dilations: Sequence[int]) -> List[Tuple[int, int]]:
    """The 8 (dy, dx) neighbours of a pixel at each dilation (the pixel itself excluded)."""
    return [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def _shifted(padded: torch.Tensor, pad: int, dy: int, dx: int, size: Tuple[int, int]) -> torch.Tensor:
    """View of x(i + dy, j + dx) from x replicate-padded by `pad`: out-of-image neighbours are the nearest
    border pixel (replicate padding = clamped indices, whatever the pad width)."""
    h, w = size
    return padded[..., pad + dy:pad + dy + h, pad + dx:pad + dx + w]


class PAMR:
    """PAMR with `iterations` refinement steps over neighbours at `dilations` (pixels)."""

    def __init__(self, iterations: int = 10, dilations: Sequence[int] = (8, 16)):
        if iterations < 0:
            raise ValueError(f"PAMR iterations must be >= 0, got {iterations}")
        if not dilations or any(int(d) < 1 for d in dilations):
            raise ValueError(f"PAMR dilations must be positive integers, got {list(dilations)}")
        self.iterations = int(iterations)
        self.dilations = tuple(int(d) for d in dilations)
        self.offsets = neighbour_offsets(self.dilations)

    @torch.no_grad()
    def affinity(self, image: torch.Tensor) -> torch.Tensor:
        """Neighbour weights of every pixel: (K, H, W) image -> (P, H, W), summing to 1 over the P neighbours.

        weight_p ∝ exp(-mean_k |I_k(n_p) - I_k(x)| / (0.1 * std_k(x))), std_k over the pixel's 3x3
        neighbourhoods at all dilations (centre included once per dilation, unbiased), as in the PAMR paper.
        """
        if image.dim() != 3:
            raise ValueError(f"PAMR expects a (K, H, W) image, got shape {tuple(image.shape)}")
        image = image.float()
        size = tuple(image.shape[-2:])
        pad = max(self.dilations)
        padded = F.pad(image[None], (pad,) * 4, mode="replicate")[0]
        window = [_shifted(padded, pad, dy * d, dx * d, size)
                  for d in self.dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        std = torch.stack(window, 0).std(0)  # (K, H, W)
        scale = 1e-8 + 0.1 * std
        logits = torch.stack([(_shifted(padded, pad, dy, dx, size) - image).abs().div_(scale).mean(0)
                              for dy, dx in self.offsets])  # (P, H, W)
        return (-logits).softmax(0)

    @torch.no_grad()
    def propagate(self, mask: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
        """`iterations` steps of mask(x) <- sum_p affinity_p(x) * mask(n_p(x)): (C, H, W) -> (C, H, W)."""
        if mask.shape[-2:] != affinity.shape[-2:]:
            raise ValueError(f"PAMR mask {tuple(mask.shape)} and affinity {tuple(affinity.shape)} sizes differ")
        size = tuple(mask.shape[-2:])
        pad = max(self.dilations)
        for _ in range(self.iterations):
            padded = F.pad(mask[None], (pad,) * 4, mode="replicate")[0]
            out = torch.zeros_like(mask)
            for (dy, dx), weight in zip(self.offsets, affinity):
                out.addcmul_(_shifted(padded, pad, dy, dx, size), weight)
            mask = out
        return mask

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Refine (C, H, W) scores with a (K, H, W) image of the same size."""
        return self.propagate(mask, self.affinity(image))
