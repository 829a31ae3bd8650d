"""Set-prediction losses of the mask segmentor: class CE over matched / unmatched queries and point-sampled
mask BCE + dice over matched ones, and optionally ViLD-image's L1 distillation of matched queries' region
embeddings, on the final and (deep supervision) every intermediate prediction."""
from __future__ import annotations

from typing import Dict, List

import detectron2.utils.comm as comm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from torch import nn

from .matcher import HungarianMatcher, pixel_center_points


def sigmoid_bce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """(M, P) logits and targets -> sum over masks of the mean BCE per mask, / num_masks."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum() / num_masks


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """(M, P) logits and targets -> sum over masks of 1 - (2|p.t| + 1) / (|p| + |t| + 1), / num_masks."""
    p = logits.sigmoid()
    dice = 1 - (2 * (p * targets).sum(-1) + 1) / (p.sum(-1) + targets.sum(-1) + 1)
    return dice.sum() / num_masks


def _uncertainty(logits: torch.Tensor) -> torch.Tensor:
    # most uncertain = logit closest to 0
    return -logits.abs()


class SetCriterion(nn.Module):
    """Hungarian-matched losses. Returns a dict of weighted losses ("loss_ce", "loss_mask", "loss_dice", with
    `vild_image_weight` > 0 also "loss_vild_image", and "..._<i>" for the i-th intermediate prediction) that
    detectron2's trainer sums."""

    @configurable
    def __init__(self, *, matcher: HungarianMatcher, class_weight: float = 2.0, mask_weight: float = 5.0,
                 dice_weight: float = 5.0, no_object_weight: float = 0.1, num_points: int = 12544,
                 oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 deep_supervision: bool = True, vild_image_weight: float = 0.0):
        """
        Args:
            matcher: assigns queries to targets.
            class_weight, mask_weight, dice_weight: loss weights.
            no_object_weight: CE weight of the void class (unmatched queries).
            num_points, oversample_ratio, importance_sample_ratio: point sampling of the mask losses (PointRend's
                uncertainty-based importance sampling); num_points <= 0 uses every cell of the prediction grid.
            deep_supervision: add the losses of the intermediate predictions.
            vild_image_weight: weight of ViLD-image's distillation loss (`image_embed_loss`); 0 = off.
        """
        super().__init__()
        self.matcher = matcher
        if vild_image_weight < 0:
            raise ValueError(f"MODEL.MASK_SEG.VILD.IMAGE_LOSS_WEIGHT={vild_image_weight} must be >= 0")
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        if vild_image_weight > 0:
            self.weights["loss_vild_image"] = vild_image_weight
        self.no_object_weight = no_object_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision

    @classmethod
    def from_config(cls, cfg):
        loss = cfg.MODEL.MASK_SEG.LOSS
        return {
            "matcher": HungarianMatcher(cfg),
            "class_weight": loss.CLASS_WEIGHT, "mask_weight": loss.MASK_WEIGHT, "dice_weight": loss.DICE_WEIGHT,
            "no_object_weight": loss.NO_OBJECT_WEIGHT, "num_points": loss.NUM_POINTS,
            "oversample_ratio": loss.OVERSAMPLE_RATIO, "importance_sample_ratio": loss.IMPORTANCE_SAMPLE_RATIO,
            "deep_supervision": loss.DEEP_SUPERVISION,
            "vild_image_weight": cfg.MODEL.MASK_SEG.VILD.IMAGE_LOSS_WEIGHT if cfg.MODEL.MASK_SEG.VILD.ENABLED else 0.0,
        }

    def class_loss(self, logits: torch.Tensor, targets: List[Dict[str, torch.Tensor]], indices) -> torch.Tensor:
        """Weighted CE over all queries; unmatched queries are taught the void class (index K)."""
        b, q, k1 = logits.shape
        target_classes = torch.full((b, q), k1 - 1, dtype=torch.int64, device=logits.device)
        for i, ((src, tgt_idx), tgt) in enumerate(zip(indices, targets)):
            target_classes[i, src.to(logits.device)] = tgt["labels"][tgt_idx.to(tgt["labels"].device)]
        weight = torch.ones(k1, device=logits.device, dtype=torch.float32)
        weight[-1] = self.no_object_weight
        return F.cross_entropy(logits.float().transpose(1, 2), target_classes, weight)

    def mask_losses(self, masks: torch.Tensor, targets: List[Dict[str, torch.Tensor]], indices,
                    num_masks: float) -> Dict[str, torch.Tensor]:
        src = torch.cat([masks[i, s.to(masks.device)] for i, (s, _) in enumerate(indices)])  # (M, h, w)
        tgt = torch.cat([t["masks"][j.to(t["masks"].device)] for t, (_, j) in zip(targets, indices)])
        if len(src) == 0:
            zero = masks.sum() * 0.0  # keeps the graph connected
            return {"loss_mask": zero, "loss_dice": zero}
        src = src[:, None].float()  # (M, 1, h, w)
        tgt = tgt[:, None].to(src.dtype)  # (M, 1, H, W)
        with torch.no_grad():
            if self.num_points > 0:
                points = get_uncertain_point_coords_with_randomness(
                    src, _uncertainty, self.num_points, self.oversample_ratio, self.importance_sample_ratio)
            else:
                points = pixel_center_points(*src.shape[-2:], device=src.device)[None].expand(len(src), -1, -1)
            labels = point_sample(tgt, points, align_corners=False)[:, 0]  # (M, P)
        logits = point_sample(src, points, align_corners=False)[:, 0]
        return {"loss_mask": sigmoid_bce_loss(logits, labels, num_masks),
                "loss_dice": dice_loss(logits, labels, num_masks)}

    def image_embed_loss(self, embeds: torch.Tensor, targets: List[Dict[str, torch.Tensor]], indices,
                         num_masks: float) -> torch.Tensor:
        """ViLD-image: sum over matched (query, segment) pairs of || e_q / |e_q| - t_s / |t_s| ||_1, / num_masks.

        `embeds` (B, Q, D) are the queries' region embeddings; each target's "clip_embeds" (N_i, D) the frozen
        CLIP embeddings of its segments. As the authors' loss (vild_model.py: L1 summed over the D dims, averaged
        over the distilled regions), both sides L2-normalised; unmatched queries are not distilled."""
        src = torch.cat([embeds[i, s.to(embeds.device)] for i, (s, _) in enumerate(indices)])  # (M, D)
        if len(src) == 0:
            return embeds.sum() * 0.0  # keeps the graph connected
        tgt = torch.cat([t["clip_embeds"][j.to(t["clip_embeds"].device)] for t, (_, j) in zip(targets, indices)])
        src, tgt = F.normalize(src.float(), dim=-1), F.normalize(tgt.float().to(src.device), dim=-1)
        return (src - tgt).abs().sum() / num_masks

    def single(self, outputs: Dict[str, torch.Tensor], targets, num_masks: float) -> Dict[str, torch.Tensor]:
        indices = self.matcher(outputs, targets)
        losses = {"loss_ce": self.class_loss(outputs["pred_logits"], targets, indices)}
        losses.update(self.mask_losses(outputs["pred_masks"], targets, indices, num_masks))
        if "loss_vild_image" in self.weights:
            if "pred_image_embeds" not in outputs or any("clip_embeds" not in t for t in targets):
                raise ValueError("the ViLD-image loss needs the outputs' 'pred_image_embeds' and the targets' "
                                 "'clip_embeds' (MODEL.MASK_SEG.VILD.ENABLED builds both)")
            losses["loss_vild_image"] = self.image_embed_loss(outputs["pred_image_embeds"], targets, indices,
                                                              num_masks)
        return {k: v * self.weights[k] for k, v in losses.items()}

    def forward(self, outputs: Dict[str, object], targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: "pred_logits" (B, Q, K + 1), "pred_masks" (B, Q, h, w), with the ViLD-image loss
                "pred_image_embeds" (B, Q, D); optional "aux_outputs" (a list of dicts with the same keys).
            targets: per image "labels" (N_i,) int64 and "masks" (N_i, H, W) over the same padded extent; with the
                ViLD-image loss "clip_embeds" (N_i, D).
        """
        num_masks = torch.tensor(float(sum(len(t["labels"]) for t in targets)),
                                 device=outputs["pred_masks"].device)
        if comm.get_world_size() > 1:
            dist.all_reduce(num_masks)
        num_masks = max(num_masks.item() / comm.get_world_size(), 1.0)  # mean over workers, as the gradients are
        losses = self.single(outputs, targets, num_masks)
        if self.deep_supervision:
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                losses.update({f"{k}_{i}": v for k, v in self.single(aux, targets, num_masks).items()})
        return losses
