"""Hungarian matching of predicted masks to ground-truth segments (class + mask BCE + dice costs)."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.projects.point_rend.point_features import point_sample
from scipy.optimize import linear_sum_assignment
from torch import nn


def pixel_center_points(height: int, width: int, device=None) -> torch.Tensor:
    """(height * width, 2) normalised (x, y) coordinates of every cell centre of a height x width grid."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.flatten(), gy.flatten()], dim=-1)


def pairwise_sigmoid_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of every prediction against every target.

    Args:
        logits: (Q, P) mask logits at P points; targets: (N, P) in [0, 1].
    Returns:
        (Q, N): cost[q, n] = mean_p BCE(logits[q, p], targets[n, p]).
    """
    pos = F.softplus(-logits)  # BCE where the target is 1
    neg = F.softplus(logits)  # BCE where the target is 0
    return (pos @ targets.t() + neg @ (1 - targets).t()) / logits.shape[1]


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(Q, P) logits, (N, P) targets -> (Q, N) dice loss 1 - (2|p.t| + 1) / (|p| + |t| + 1)."""
    p = logits.sigmoid()
    inter = p @ targets.t()
    return 1 - (2 * inter + 1) / (p.sum(-1)[:, None] + targets.sum(-1)[None, :] + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising
    class_weight * (-p(target class)) + mask_weight * BCE + dice_weight * dice,
    the mask terms measured on points shared by all queries and targets of an image."""

    @configurable
    def __init__(self, *, class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
                 num_points: int = 12544):
        """
        Args:
            class_weight, mask_weight, dice_weight: cost weights.
            num_points: uniformly random points per image for the mask costs; <= 0 uses every cell centre of
                the prediction grid (exact, for tests and small masks).
        """
        super().__init__()
        if class_weight == 0 and mask_weight == 0 and dice_weight == 0:
            raise ValueError("the matcher needs at least one non-zero cost weight")
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points

    @classmethod
    def from_config(cls, cfg):
        loss = cfg.MODEL.MASK_SEG.LOSS
        return {"class_weight": loss.CLASS_WEIGHT, "mask_weight": loss.MASK_WEIGHT, "dice_weight": loss.DICE_WEIGHT,
                "num_points": loss.NUM_POINTS}

    def sample_points(self, masks: torch.Tensor) -> torch.Tensor:
        """(1, P, 2) normalised (x, y) points shared by every query and target of one image with (Q, h, w) masks."""
        if self.num_points > 0:
            return torch.rand(1, self.num_points, 2, device=masks.device)
        return pixel_center_points(*masks.shape[-2:], device=masks.device)[None]

    @torch.no_grad()
    def cost_matrix(self, logits: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                    target_masks: torch.Tensor, points: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            logits: (Q, K + 1) class logits (last = void); masks: (Q, h, w) mask logits.
            labels: (N,) target classes; target_masks: (N, H, W) binary, same extent as `masks`.
            points: (1, P, 2) where the mask costs are measured; None draws them (`sample_points`).
        Returns:
            (Q, N) matching cost.
        """
        if points is None:
            points = self.sample_points(masks)
        pred = point_sample(masks[:, None].float(), points.expand(len(masks), -1, -1), align_corners=False)[:, 0]
        tgt = point_sample(target_masks[:, None].float(), points.expand(len(target_masks), -1, -1),
                           align_corners=False)[:, 0]  # (N, P)
        cost_class = -logits.float().softmax(-1)[:, labels]  # (Q, N)
        return (self.class_weight * cost_class + self.mask_weight * pairwise_sigmoid_bce(pred, tgt)
                + self.dice_weight * pairwise_dice(pred, tgt))

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]
                ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            outputs: "pred_logits" (B, Q, K + 1), "pred_masks" (B, Q, h, w).
            targets: per image "labels" (N_i,) and "masks" (N_i, H, W).
        Returns:
            per image (query indices, target indices), int64, sorted by query, length min(Q, N_i).
        """
        out = []
        for logits, masks, tgt in zip(outputs["pred_logits"], outputs["pred_masks"], targets):
            # drawn for every image, also one without targets, so that the random stream follows Mask2Former's
            points = self.sample_points(masks)
            if len(tgt["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                out.append((empty, empty))
                continue
            cost = self.cost_matrix(logits, masks, tgt["labels"], tgt["masks"], points)
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return out
