"""GroupViT: semantic segmentation that emerges from image-text training (Xu et al., CVPR 2022).

Training (mapper "image_caption"): the grouping ViT's segment tokens, averaged and projected, against the caption's
text embedding (CLIP's contrastive loss), plus the multi-label contrastive loss against prompts of nouns named in
the caption ("a photo of a {noun}."). The text encoder is open_clip's text transformer built from
MODEL.GROUPVIT.TEXT_* and trained from scratch with the model, as GroupViT does (not ovseg's frozen CLIP
`TextClassifier`). Inference: zero-shot semantic segmentation by assigning pixels to groups and groups to classes
(`group_to_class_segmentation`), evaluated by the semantic evaluators.
"""
from __future__ import annotations

import math
import random
from typing import Dict, List, Optional, Sequence

import open_clip
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ..groupvit import (
    GroupViTEncoder,
    ProjectionMLP,
    build_text_tower,
    contrastive_loss,
    group_to_class_segmentation,
    multi_label_contrastive_loss,
)
from ..text import Vocabulary, get_templates
from .base import OpenVocabModel
from .dense_segmentor import sliding_windows

TEST_MODES = ("whole", "slide")


@META_ARCH_REGISTRY.register()
class GroupViTSegmentor(OpenVocabModel):
    """`backbone` = the grouping ViT (`GroupViTEncoder`); `text_tower` = a text transformer trained with it.

    Training inputs: "image" (3, S, S) 0-255 RGB, "caption" str, "nouns" list of str. Returns
    ``{"loss_contrastive", "loss_multi_label"}``. Inference inputs: "image" (+ "height", "width"); returns per
    image ``{"sem_seg": (C, height, width)}`` class scores of the current vocabulary.
    """

    @configurable
    def __init__(self, *, backbone: GroupViTEncoder, text_tower: nn.Module, tokenizer, image_proj: nn.Module,
                 text_proj: nn.Module, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 temperature: float = 0.07, multi_label: int = 3, multi_label_weight: float = 1.0,
                 noun_templates: Sequence[str] = ("a photo of a {}.",),
                 test_templates: Sequence[str] = ("a photo of a {}.",),
                 top_k_classes: int = 5, bg_threshold: float = 0.95, background_class: str = "background",
                 text_batch_size: int = 1024, test_mode: str = "whole", window_size: int = 448,
                 window_stride: int = 224, vocabulary=None, vocabulary_dataset: Optional[str] = None):
        """
        Args:
            backbone: the grouping image encoder; text_tower: tokens (T, L) -> (T, width) features.
            tokenizer: open_clip tokenizer: list of str -> (T, L) ids.
            image_proj, text_proj: projections into the joint space (`ProjectionMLP`).
            temperature: initial temperature of both losses (each its own learned scale).
            multi_label: prompted nouns per caption (0 = no multi-label loss); multi_label_weight: its weight.
            noun_templates: prompts for the nouns, one drawn per noun; test_templates: the class prompts at test
                time (their embeddings averaged per class).
            top_k_classes, bg_threshold, background_class: the segmentation rule (`group_to_class_segmentation`);
                bg_threshold 0 = no background rule.
            test_mode: "whole" image at once, or "slide": `window_size` squared windows every `window_stride` pixels
                (`sliding_windows`), each segmented on its own, their scores averaged where they overlap.
        """
        if test_mode not in TEST_MODES:
            raise ValueError(f"MODEL.GROUPVIT.TEST.MODE={test_mode!r}; use one of {list(TEST_MODES)}")
        if window_size <= 0 or window_stride <= 0:
            raise ValueError(f"MODEL.GROUPVIT.TEST: WINDOW_SIZE ({window_size}) and STRIDE ({window_stride}) must be "
                             "positive")
        super().__init__(backbone=backbone, text_classifier=None, pixel_mean=pixel_mean, pixel_std=pixel_std,
                         vocabulary=vocabulary, vocabulary_dataset=vocabulary_dataset)
        self.text_tower = text_tower
        self.tokenizer = tokenizer
        self.image_proj = image_proj
        self.text_proj = text_proj
        init = math.log(1.0 / temperature)
        self.logit_scale = nn.Parameter(torch.tensor(init))
        self.multi_label = int(multi_label)
        self.multi_label_weight = float(multi_label_weight)
        self.multi_label_logit_scale = nn.Parameter(torch.tensor(init)) if self.multi_label > 0 else None
        self.noun_templates = tuple(noun_templates)
        self.test_templates = tuple(test_templates)
        self.top_k_classes = int(top_k_classes)
        self.bg_threshold = float(bg_threshold)
        self.background_class = background_class
        self.text_batch_size = int(text_batch_size)
        self.test_mode = test_mode
        self.window_size = int(window_size)
        self.window_stride = int(window_stride)

    @classmethod
    def from_config(cls, cfg):
        g = cfg.MODEL.GROUPVIT
        cls.check_scores_only(cfg)
        backbone = GroupViTEncoder(
            img_size=cfg.INPUT.CAPTIONS.IMAGE_SIZE, patch_size=g.PATCH_SIZE, embed_dim=g.EMBED_DIM, depths=g.DEPTHS,
            num_heads=g.NUM_HEADS, num_group_tokens=g.NUM_GROUP_TOKENS, num_output_groups=g.NUM_OUTPUT_GROUPS,
            hard_assignment=g.HARD_ASSIGNMENT, gumbel=g.GUMBEL, gumbel_tau=g.GUMBEL_TAU,
            drop_path_rate=g.DROP_PATH_RATE)
        text = build_text_tower(context_length=g.TEXT_CONTEXT_LENGTH, width=g.TEXT_WIDTH, layers=g.TEXT_LAYERS,
                                heads=g.TEXT_HEADS)
        return {
            **cls.vocabulary_args(cfg),
            "backbone": backbone,
            "text_tower": text,
            "tokenizer": open_clip.SimpleTokenizer(context_length=g.TEXT_CONTEXT_LENGTH),
            "image_proj": ProjectionMLP(g.EMBED_DIM, g.PROJ_DIM, g.PROJ_HIDDEN_DIM, g.PROJ_LAYERS),
            "text_proj": ProjectionMLP(g.TEXT_WIDTH, g.PROJ_DIM, g.PROJ_HIDDEN_DIM, g.PROJ_LAYERS),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "temperature": g.TEMPERATURE,
            "multi_label": g.MULTI_LABEL,
            "multi_label_weight": g.MULTI_LABEL_WEIGHT,
            "noun_templates": get_templates(g.NOUN_TEMPLATES),
            "test_templates": get_templates(cfg.MODEL.TEXT.TEMPLATES),
            "top_k_classes": g.TOP_K_CLASSES,
            "bg_threshold": g.BG_THRESHOLD,
            "background_class": g.BACKGROUND_CLASS,
            "text_batch_size": cfg.MODEL.TEXT.BATCH_SIZE,
            "test_mode": g.TEST.MODE,
            "window_size": g.TEST.WINDOW_SIZE,
            "window_stride": g.TEST.STRIDE,
        }

    def parameters_needing_weights(self, clip_pretrained: bool) -> List[str]:
        """Every trainable parameter: GroupViT loads no CLIP weights."""
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ encoders
    def encode_image(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, 3, H, W) normalised images -> {"image": (B, P) projected mean token, "groups": (B, G, P) projected
        segment tokens, "assignments": per grouping stage (B, G_i, G_{i-1}), "grid": (h, w)}."""
        tokens, assignments, grid = self.backbone(images)  # (B, G, D)
        return {"image": self.image_proj(tokens.mean(1)), "groups": self.image_proj(tokens),
                "assignments": assignments, "grid": grid}

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings -> (T, P) projected text embeddings (not normalised)."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.text_proj(self.text_tower(tokens))

    def prompts_for(self, caption: str, nouns: Sequence[str]) -> List[str]:
        """MULTI_LABEL texts for a caption: up to that many of its nouns (drawn without repetition), each in a
        template drawn at random, then the caption itself as filler (the authors' WordAugTokenizeWrapper)."""
        k = self.multi_label
        chosen = random.sample(list(nouns), min(k, len(nouns)))
        return [random.choice(self.noun_templates).format(n) for n in chosen] + [caption] * (k - len(chosen))

    # ------------------------------------------------------------------ training
    def losses(self, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        for inp in batched_inputs:
            if "caption" not in inp:
                raise ValueError("GroupViTSegmentor trains on captioned images: set INPUT.DATASET_MAPPER_NAME "
                                 "'image_caption' and a captioned dataset in DATASETS.TRAIN")
        images = self.preprocess(batched_inputs, min_size=self.backbone.patch_size)
        image = self.encode_image(images.tensor)["image"]  # (B, P)
        captions = [inp["caption"] for inp in batched_inputs]
        k = self.multi_label
        prompts = [p for inp in batched_inputs for p in self.prompts_for(inp["caption"], inp.get("nouns", []))]
        text = self.encode_text(captions + prompts)  # one forward: BN statistics over captions and prompts alike
        b = len(captions)
        out = {"loss_contrastive": contrastive_loss(image, text[:b], self.logit_scale)}
        if k > 0:
            out["loss_multi_label"] = self.multi_label_weight * multi_label_contrastive_loss(
                image, text[b:].reshape(b, k, -1), self.multi_label_logit_scale)
        return out

    # ------------------------------------------------------------------ inference
    def class_embeddings(self, vocabulary: Vocabulary) -> torch.Tensor:
        """(C, P) normalised class embeddings: the mean over each class's (synonym, template) prompts of the
        projected text embedding, then normalised (the authors' `build_text_embedding`). Without autograd they are
        kept until the vocabulary, the autocast dtype or a text weight (in-place version, storage) changes: the
        text tower would otherwise run on every image."""
        if torch.is_grad_enabled():
            return self._class_embeddings(vocabulary)
        params = [*self.text_tower.parameters(), *self.text_proj.parameters()]
        key = (vocabulary, torch.is_autocast_enabled(self.device.type) and torch.get_autocast_dtype(self.device.type),
               tuple((p.data_ptr(), p._version) for p in params))
        cached = getattr(self, "_text_cache", None)
        if cached is None or cached[0] != key:
            cached = self._text_cache = (key, self._class_embeddings(vocabulary))
        return cached[1]

    def _class_embeddings(self, vocabulary: Vocabulary) -> torch.Tensor:
        texts, owner = [], []
        for c, synonyms in enumerate(vocabulary.classes):
            for s in synonyms:
                texts += [t.format(s) for t in self.test_templates]
                owner += [c] * len(self.test_templates)
        embeds = torch.cat([self.encode_text(texts[i:i + self.text_batch_size])
                            for i in range(0, len(texts), self.text_batch_size)])
        owner_t = torch.tensor(owner, device=embeds.device)
        # float32 sums: under autocast the text tower's output is in the low precision
        sums = torch.zeros(len(vocabulary), embeds.shape[-1], device=embeds.device).index_add_(0, owner_t,
                                                                                            embeds.float())
        return F.normalize(sums, dim=-1)

    def background_index(self, vocabulary: Vocabulary) -> Optional[int]:
        """Index of BACKGROUND_CLASS in the vocabulary when the background rule is on (else None)."""
        if self.bg_threshold <= 0:
            return None
        names = [n.lower() for n in vocabulary.names]
        return names.index(self.background_class.lower()) if self.background_class.lower() in names else None

    def segment(self, image: torch.Tensor, text: torch.Tensor, background: Optional[int] = None) -> torch.Tensor:
        """The tensor-only core: one (1, 3, H, W) normalised image (H, W multiples of the patch size) and (C, P)
        normalised class embeddings -> (C, H, W) class scores; with `background` (an index into the C classes) that
        class is left out of the group-to-class matching and scored by the background rule."""
        enc = self.encode_image(image)
        fg = [i for i in range(text.shape[0]) if i != background]
        scores = group_to_class_segmentation(
            [a[0] for a in enc["assignments"]], enc["groups"][0], enc["image"][0], text[fg],
            self.logit_scale.exp().clamp(max=100), enc["grid"], tuple(image.shape[-2:]),
            top_k=self.top_k_classes, bg_threshold=self.bg_threshold if background is not None else None)
        if background is None:
            return scores
        out = torch.empty(text.shape[0], *scores.shape[1:], device=scores.device, dtype=scores.dtype)
        out[background] = scores[0]
        out[fg] = scores[1:]
        return out

    def segment_image(self, image: torch.Tensor, text: torch.Tensor, background: Optional[int] = None
                      ) -> torch.Tensor:
        """One (3, H, W) normalised image of any size -> (C, H, W) class scores by TEST.MODE: "whole", or "slide"
        (mmseg's slide inference, as the authors evaluate): each window padded to the patch size and segmented on
        its own (its own top-k classes and background rule), the scores summed and divided by the number of windows
        covering each pixel."""
        p = self.backbone.patch_size
        h, w = image.shape[-2:]
        windows = [(0, 0, h, w)] if self.test_mode == "whole" else sliding_windows(
            (h, w), self.window_size, self.window_stride)
        total = count = None
        for y0, x0, y1, x1 in windows:
            wh, ww = y1 - y0, x1 - x0
            crop = F.pad(image[:, y0:y1, x0:x1], (0, -ww % p, 0, -wh % p))
            scores = self.segment(crop[None], text, background)[:, :wh, :ww]  # (C, wh, ww)
            if len(windows) == 1:
                return scores
            if total is None:
                total = scores.new_zeros((scores.shape[0], h, w))
                count = scores.new_zeros((1, h, w))
            total[:, y0:y1, x0:x1] += scores
            count[:, y0:y1, x0:x1] += 1
        return total / count

    @torch.no_grad()
    def inference(self, batched_inputs: List[Dict]) -> List[Dict[str, torch.Tensor]]:
        vocab = self.vocabulary
        text = self.class_embeddings(vocab)
        background = self.background_index(vocab)
        p = self.backbone.patch_size
        results = []
        for inp in batched_inputs:  # one at a time: padding would join the groups
            self.check_image(inp["image"], p)
            image = self.normalize(inp["image"])
            h, w = image.shape[-2:]
            scores = self.segment_image(image, text, background)
            out = (inp.get("height", h), inp.get("width", w))
            if out != (h, w):
                scores = F.interpolate(scores[None], size=out, mode="bilinear", align_corners=False)[0]
            results.append({"sem_seg": scores})
        return results

    def forward(self, batched_inputs: List[Dict]):
        if self.training:
            return self.losses(batched_inputs)
        return self.inference(batched_inputs)
