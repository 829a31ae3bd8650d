"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, "Single-Stage Semantic Segmentation from Image Labels",
CVPR 2020), in plain PyTorch.

Each iteration replaces every pixel's scores by an affinity-weighted average of its neighbours' scores (8 neighbours
at each dilation). The affinities come from the image: neighbours whose colour is close, relative to the local
colour spread, get more weight (softmax over all neighbours of all dilations). They depend on the image only, so
`affinities` is computed once and `propagate` can refine the classes chunk by chunk (847 classes at full
resolution never need 8 x len(dilations) shifted copies, nor more than a chunk's worth of temporaries).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

_RING = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def neighbour_offsets(dilations: Sequence[int]) -> List[Tuple[int, int]]:
    """(dy, dx) of the 8 neighbours at each dilation, in a fixed order."""
    return [(dy * d, dx * d) for d in dilations for dy, dx in _RING]


class PAMR(nn.Module):
    def __init__(self, num_iter: int = 10, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24)):
        super().__init__()
        if num_iter < 1 or not dilations or min(dilations) < 1:
            raise ValueError(f"PAMR needs num_iter >= 1 and positive dilations, got {num_iter}, {list(dilations)}")
        self.num_iter = num_iter
        self.dilations = tuple(int(d) for d in dilations)
        self.offsets = neighbour_offsets(self.dilations)
        self.pad = max(self.dilations)

    def _views(self, x: torch.Tensor, offsets: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
        # views of a replicate-padded tensor (= indices clamped to the image, whatever the pad): slices, no copies
        h, w = x.shape[-2:]
        xp = F.pad(x, (self.pad,) * 4, mode="replicate")
        return [xp[..., self.pad + dy:self.pad + dy + h, self.pad + dx:self.pad + dx + w] for dy, dx in offsets]

    @torch.no_grad()
    def affinities(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) image -> (B, K, H, W) neighbour weights summing to 1 over the K = 8 x len(dilations).

        The colour spread is the unbiased std over each dilation's 3x3 neighbourhood, pooled over dilations (the
        centre counted once per dilation), as in the PAMR authors' code that SCLIP and NACLIP reuse.
        """
        image = image.float()
        views = self._views(image, self.offsets)
        n = len(views) + len(self.dilations)
        total = image * len(self.dilations) + sum(views)
        total_sq = image ** 2 * len(self.dilations) + sum(v ** 2 for v in views)
        std = ((total_sq - total ** 2 / n) / (n - 1)).clamp(min=0).sqrt()  # (B, 3, H, W)
        logits = torch.stack([(-(v - image).abs() / (1e-8 + 0.1 * std)).mean(1) for v in views], dim=1)
        return logits.softmax(dim=1)

    @torch.no_grad()
    def propagate(self, scores: torch.Tensor, affinities: torch.Tensor) -> torch.Tensor:
        """`num_iter` steps of s(x) <- sum_k a_k(x) s(n_k(x)): (B, C, H, W) scores, (B, K, H, W) affinities."""
        if affinities.shape[-2:] != scores.shape[-2:]:
            raise ValueError(f"PAMR: image {tuple(affinities.shape[-2:])} and scores {tuple(scores.shape[-2:])} "
                             "sizes differ")
        for _ in range(self.num_iter):
            out = torch.zeros_like(scores)
            for k, view in enumerate(self._views(scores, self.offsets)):
                out.addcmul_(view, affinities[:, k:k + 1])
            scores = out
        return scores

    def forward(self, image: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Refine (B, C, H, W) scores with the (B, 3, H, W) image at the same resolution."""
        if image.shape[-2:] != scores.shape[-2:]:
            raise ValueError(f"PAMR: image {tuple(image.shape[-2:])} and scores {tuple(scores.shape[-2:])} differ")
        return self.propagate(scores, self.affinities(image).to(scores.dtype))
