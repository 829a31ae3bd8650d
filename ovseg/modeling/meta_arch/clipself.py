"""CLIPSelf: the CLIP ViT distils its own image-level recognition into its dense features.

Wu et al., "CLIPSelf: Vision Transformer Distills Itself for Open-Vocabulary Dense Prediction" (ICLR 2024).
The student's dense map pooled over a region is pulled (cosine loss) toward the frozen teacher's image
embedding of that region cut out of the image. No text and no labels are needed for training; the text tower is
kept for the region-recognition evaluation and for exporting a complete open_clip checkpoint.
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList
from torch import nn

from ..backbone.clip_vit import CLIPViTDenseEncoder
from ..region_pooling import pool_boxes, pool_masks, region_scores
from ..text import TextClassifier
from .base import OpenVocabModel

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class CLIPSelfDistiller(OpenVocabModel):
    """Student (`backbone`) = CLIP dense encoder with its last blocks unlocked; teacher = frozen copy of the original
    tower.

    Training inputs (mapper "clipself"): "image" (3, h, w) 0-255 RGB, "region_boxes" (K_i, 4) xyxy in image
    pixels, "crops" (K_i, 3, S, S) the same regions cut from the original image. Returns
    ``{"loss_clipself": weight * mean(1 - cos(student region feature, teacher crop embedding))}``.

    Inference inputs (mapper "region_recognition"): "image", "region_boxes", "region_masks" (K, h, w). Returns per
    image ``{"box_region_scores": (K, C), "mask_region_scores": (K, C)}``: cosine similarities between the
    student's dense features pooled over each region's box / mask and the vocabulary's text embeddings.
    """

    @configurable
    def __init__(self, *, backbone: CLIPViTDenseEncoder, teacher: CLIPViTDenseEncoder,
                 text_classifier: Optional[TextClassifier], pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 loss_weight: float = 1.0, ensemble_alpha: float = 1.0, vocabulary=None,
                 vocabulary_dataset: Optional[str] = None):
        """
        Args:
            backbone: the student, the dense encoder being refined (its `unlock_last_blocks` decide what trains);
                named like every ovseg model's encoder, so its checkpoints read as CLIP checkpoints.
            teacher: the original tower as a frozen dense encoder; its `encode_image` embeds the crops.
            text_classifier: the frozen text tower (region recognition, export); None = training only.
            pixel_mean, pixel_std: normalisation of 0-255 RGB inputs (images and crops alike).
            loss_weight: multiplier of the cosine loss.
            ensemble_alpha: weight of the student in the end-of-training mix with the teacher
                (`ensemble_with_teacher_`); 1.0 keeps the student as trained.
            vocabulary: initial vocabulary for inference; `set_vocabulary` changes it.
            vocabulary_dataset: the dataset `vocabulary` is given for (see `OpenVocabModel`).
        """
        super().__init__(backbone=backbone, text_classifier=text_classifier, pixel_mean=pixel_mean,
                         pixel_std=pixel_std, vocabulary=vocabulary, vocabulary_dataset=vocabulary_dataset)
        if backbone.patch_size != teacher.patch_size or backbone.embed_dim != teacher.embed_dim:
            raise ValueError("student and teacher must be the same CLIP architecture")
        if not any(p.requires_grad for p in backbone.parameters()):
            logger.warning("CLIPSelfDistiller: the student has no unlocked parameter (MODEL.CLIP.UNLOCK_LAST_BLOCKS "
                           "0, no UNLOCK_PATTERNS); nothing can be trained")
        self.teacher = teacher  # the frozen original; `backbone` is the student
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.loss_weight = loss_weight
        if not 0.0 <= float(ensemble_alpha) <= 1.0:  # also rejects NaN
            raise ValueError(f"MODEL.CLIPSELF.ENSEMBLE_ALPHA must be in [0, 1] (1.0 = no ensemble), got "
                             f"{ensemble_alpha!r}")
        self.ensemble_alpha = float(ensemble_alpha)

    @classmethod
    def from_config(cls, cfg):
        clip = cls.clip_parts(cfg)
        # taken before any training step: the original weights
        teacher_visual = copy.deepcopy(clip["backbone"].tower.visual)
        return {
            **clip,
            **cls.vocabulary_args(cfg),
            "teacher": CLIPViTDenseEncoder(visual=teacher_visual, feature_blocks=[0], dense_mode="value",
                                           unlock_last_blocks=0),
            "loss_weight": cfg.MODEL.CLIPSELF.LOSS_WEIGHT,
            "ensemble_alpha": cfg.MODEL.CLIPSELF.ENSEMBLE_ALPHA,
        }

    @classmethod
    def output_tasks(cls, cfg) -> Tuple[str, ...]:
        """Inference gives region scores: evaluated by region recognition (ovseg.evaluation)."""
        return ("region_recognition",)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.train(False)  # never dropout / patch dropout in the teacher
        return self

    # ------------------------------------------------------------------ weight-space ensemble
    @torch.no_grad()
    def ensembled_student_state_dict(self) -> Dict[str, torch.Tensor]:
        """The student's state dict (`backbone`'s keys) with each trained parameter (``requires_grad``: the
        unlocked blocks and UNLOCK_PATTERNS) replaced by ``alpha * student + (1 - alpha) * teacher``, as CLIPSelf's
        `student_teacher_ensemble`. Frozen tensors are the teacher's already; they are kept bit-exact rather than
        re-mixed (a float mix of two equal values need not give the value back)."""
        state = {k: v.detach().clone() for k, v in self.backbone.state_dict().items()}
        if self.ensemble_alpha == 1.0:
            return state
        teacher = dict(self.teacher.named_parameters())
        alpha = self.ensemble_alpha
        for name, p in self.backbone.named_parameters():
            if p.requires_grad:
                state[name] = alpha * p.detach() + (1.0 - alpha) * teacher[name].detach().to(p.dtype)
        return state

    def ensemble_with_teacher_(self) -> None:
        """Replace the student's trained parameters in place by their mix with the teacher
        (`ensembled_student_state_dict`); a no-op for ENSEMBLE_ALPHA 1.0. Called once, after the last training step
        and before the final checkpoint is written (the Trainer's hook), so `model_final.pth`, the evaluation after
        training and every export (`open_clip_state_dict`, `save_open_clip_checkpoint`) carry the mix."""
        if self.ensemble_alpha == 1.0:
            return
        mixed = self.ensembled_student_state_dict()
        with torch.no_grad():
            for name, p in self.backbone.named_parameters():
                if p.requires_grad:
                    p.copy_(mixed[name])
        logger.info("CLIPSelf: student mixed with the teacher in weight space, alpha %.3g", self.ensemble_alpha)

    # ------------------------------------------------------------------ steps
    def region_boxes(self, batched_inputs: List[Dict]) -> List[torch.Tensor]:
        boxes = []
        for inp in batched_inputs:
            if "region_boxes" not in inp:
                raise ValueError(
                    "CLIPSelfDistiller needs 'region_boxes' in its inputs: train with INPUT.DATASET_MAPPER_NAME "
                    "'clipself' and evaluate with INPUT.TEST_DATASET_MAPPER_NAME 'region_recognition'"
                )
            boxes.append(inp["region_boxes"].to(self.device).float().reshape(-1, 4))
        return boxes

    @torch.no_grad()
    def teacher_embeddings(self, crops: torch.Tensor) -> torch.Tensor:
        """(K, 3, S, S) 0-255 crops -> (K, D) L2-normalised teacher image embeddings, one forward for all."""
        return F.normalize(self.teacher.encode_image(self.normalize(crops)).float(), dim=-1)

    def student_region_features(self, images: ImageList, boxes: List[torch.Tensor]) -> torch.Tensor:
        """Student dense map pooled over each box (RoIAlign, 1x1): (sum K_i, D), L2-normalised."""
        dense = self.backbone(images.tensor)["clip_dense"]  # (B, D, H/p, W/p)
        return F.normalize(pool_boxes(dense, boxes, self.backbone.patch_size).float(), dim=-1)

    def distillation_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return self.loss_weight * (1.0 - (student * teacher).sum(-1)).mean()

    def segment(self, images: torch.Tensor, text: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The tensor-only core: (B, 3, H, W) normalised images (H, W multiples of the patch size) and (C, D)
        normalised text embeddings -> {"logits": (B, C, H/p, W/p)} cosine similarities of the student's dense
        features with each class."""
        dense = F.normalize(self.backbone(images)["clip_dense"].float(), dim=1)  # (B, D, H/p, W/p)
        return {"logits": torch.einsum("bdhw,cd->bchw", dense, text.to(dense.dtype))}

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.recognize_regions(batched_inputs)
        images = self.preprocess(batched_inputs)
        boxes = self.region_boxes(batched_inputs)
        crops = [inp["crops"] for inp in batched_inputs]
        for b, c in zip(boxes, crops):
            if len(b) != len(c):
                raise ValueError(f"{len(b)} region boxes but {len(c)} crops in one image")
        if sum(len(b) for b in boxes) == 0:
            # nothing to distil in this batch; keep the graph so that every process calls backward alike
            dense = self.backbone(images.tensor)["clip_dense"]
            return {"loss_clipself": dense.sum() * 0.0}
        teacher = self.teacher_embeddings(torch.cat(crops).to(self.device))  # (K, D)
        student = self.student_region_features(images, boxes)  # (K, D)
        return {"loss_clipself": self.distillation_loss(student, teacher)}

    @torch.no_grad()
    def recognize_regions(self, batched_inputs: List[Dict]) -> List[Dict[str, torch.Tensor]]:
        text = self.text_queries(self.vocabulary)[0]  # (C, D)
        images = self.preprocess(batched_inputs)
        boxes = self.region_boxes(batched_inputs)
        dense = self.backbone(images.tensor)["clip_dense"]  # (B, D, h, w) over the padded batch
        box_feats = pool_boxes(dense, boxes, self.backbone.patch_size).float().split([len(b) for b in boxes])
        results = []
        pad_h, pad_w = images.tensor.shape[-2:]
        for i, inp in enumerate(batched_inputs):
            masks = inp["region_masks"].to(self.device).float()  # (K, h_i, w_i)
            masks = F.pad(masks, (0, pad_w - masks.shape[-1], 0, pad_h - masks.shape[-2]))
            mask_feats = pool_masks(dense[i:i + 1], masks[None])[0].float()  # (K, D)
            results.append({
                "box_region_scores": region_scores(box_feats[i], text),
                "mask_region_scores": region_scores(mask_feats, text),
            })
        return results



def save_open_clip_checkpoint(model: nn.Module, path: str) -> str:
    """Write `model`'s open_clip state dict (`OpenVocabModel.open_clip_state_dict`) to `path`, loadable as
    ``MODEL.CLIP.PRETRAINED: path``."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if not isinstance(model, OpenVocabModel):
        raise TypeError(f"{type(model).__name__} cannot be exported as an open_clip checkpoint")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(model.open_clip_state_dict(), path)
    return path
