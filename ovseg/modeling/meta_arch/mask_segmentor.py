"""FC-CLIP-style open-vocabulary mask segmentor on a frozen CLIP ViT.

One frozen CLIP forward serves both jobs: its block outputs feed the mask generator (pixel decoder +
masked-attention decoder) and its `clip_dense` map classifies each predicted mask out of vocabulary.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import BitMasks, ImageList
from torch import nn

from ...data.clipself_mapper import scale_boxes
from ..backbone.clip_vit import CLIPViTDenseEncoder
from ..classifiers import (
    ClassText,
    ImageEmbeddingHead,
    InVocabClassifier,
    geometric_ensemble,
    out_of_vocab_logits,
    vild_ensemble,
)
from ..criterion import SetCriterion
from ..pixel_decoder import build_pixel_decoder
from ..postprocessing import (
    OutputMasks,
    instance_inference,
    panoptic_inference,
    resize_to_output,
    semantic_inference,
    semantic_labels,
)
from ..region_pooling import crop_boxes, pool_masks
from ..text import TextClassifier, Vocabulary
from ..transformer_decoder import build_transformer_decoder
from .base import OpenVocabModel, registered_dataset

logger = logging.getLogger(__name__)


def image_cells(images: ImageList, grid: Sequence[int]) -> torch.Tensor:
    """(B, 1, *grid) bool: the cells of a grid over the padded batch that cover each image's own pixels."""
    ph, pw = images.tensor.shape[-2:]
    rows = torch.arange(grid[0], device=images.tensor.device)[:, None]
    cols = torch.arange(grid[1], device=images.tensor.device)[None]
    # cell r starts inside the image when r < ceil(h * grid / ph), i.e. r * ph < h * grid: comparisons rather than
    # slices by a computed size, which torch.export cannot reason about for any image size
    inside = [(rows * ph < h * grid[0]) & (cols * pw < w * grid[1]) for h, w in images.image_sizes]
    return torch.stack(inside)[:, None]


def semantic_scores(probs: torch.Tensor, mask_logits: torch.Tensor, padded_size: Tuple[int, int],
                    image_size: Tuple[int, int], output_size: Tuple[int, int], resolution: str = "auto",
                    masks_resized: bool = False, labels: bool = False) -> torch.Tensor:
    """One image's `sem_seg`: (C, *output_size) scores from (Q, C + 1) probabilities and (Q, h, w) mask logits on
    the mask grid of the padded input, combined where `resolution` says (`OpenVocabMaskSegmentor`'s
    `semantic_resolution`; "auto" reads `masks_resized`: whether panoptic or instance inference is on); with
    `labels`, their (*output_size) int64 argmax, a band of rows at a time (no (C, H, W) tensor; not "padded")."""
    sizes = (padded_size, image_size, output_size)
    if resolution == "auto":  # FC-CLIP resizes the masks first when panoptic or instance inference is on
        resolution = "output" if masks_resized or labels else "padded"
    if labels:
        if resolution == "output":
            return semantic_labels(probs, OutputMasks(mask_logits, *sizes))
        if resolution == "mask":
            return semantic_labels(probs, mask_logits.sigmoid(), sizes=sizes)
        raise ValueError(f"labels at resolution {resolution!r}: use 'output' or 'mask'")
    if resolution == "output":
        return semantic_inference(probs, OutputMasks(mask_logits, *sizes))
    if resolution == "padded":  # sigmoid at the padded input size, then crop and resize the scores
        padded = OutputMasks(mask_logits, padded_size, padded_size, padded_size)
        return resize_to_output(semantic_inference(probs, padded), *sizes)
    # combine on the mask grid, resize the class scores once
    return resize_to_output(semantic_inference(probs, mask_logits.sigmoid()), *sizes)


@META_ARCH_REGISTRY.register()
class OpenVocabMaskSegmentor(OpenVocabModel):
    """Mask classification with open-vocabulary classes: N queries -> masks + CLIP-space embeddings.

    Training: Hungarian-matched class / mask / dice losses against the training vocabulary's text embeddings.
    Inference: in-vocabulary logits (query embedding vs text) ensembled with out-of-vocabulary logits (frozen
    CLIP features pooled in each mask vs text), then detectron2's `sem_seg`, `panoptic_seg` and `instances`.

    ViLD-image (optional `vild_head`): each query's class embedding is also mapped into CLIP's image space and
    distilled (L1) towards the frozen CLIP embedding of its matched ground-truth segment; at inference ViLD's
    ensemble of the text classifier and this head replaces the in-vocabulary probabilities, and the FC-CLIP
    ensemble (when `out_vocab`) combines the result with frozen CLIP.
    """

    TRAIN_VOCABULARY_SECTION = "MASK_SEG"

    @configurable
    def __init__(self, *, backbone: CLIPViTDenseEncoder, text_classifier: TextClassifier, pixel_decoder: nn.Module,
                 transformer_decoder: nn.Module, criterion: SetCriterion, in_vocab: InVocabClassifier,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float], train_vocabulary=None, vocabulary=None,
                 vocabulary_dataset: Optional[str] = None, out_vocab: bool = True,
                 out_vocab_logit_scale: float = 100.0, ensemble_alpha: float = 0.4,
                 ensemble_beta: float = 0.8, ensemble_on_valid_mask: bool = False, synonyms: str = "max",
                 soft_mask_pooling: bool = False, semantic_on: bool = True, panoptic_on: bool = True,
                 instance_on: bool = False, semantic_resolution: str = "auto", object_mask_threshold: float = 0.8,
                 overlap_threshold: float = 0.8, detections_per_image: int = 100,
                 vild_head: Optional[ImageEmbeddingHead] = None, vild_target: str = "crop",
                 vild_crop_scales: Sequence[float] = (1.0, 1.5), vild_crop_size: int = 224,
                 vild_distill_into_decoder: bool = True, vild_ensemble: bool = True,
                 vild_ensemble_alpha: float = 1.0 / 3.0, vild_ensemble_beta: float = 2.0 / 3.0,
                 sem_seg_output: str = "scores"):
        """
        Args:
            backbone, text_classifier: the frozen CLIP towers.
            pixel_decoder, transformer_decoder: the mask generator.
            criterion: training losses; in_vocab: the trained classifier head.
            pixel_mean, pixel_std: normalisation of the 0-255 RGB input.
            train_vocabulary: classes of the training data (labels index it); a dataset name, string or list.
            vocabulary: initial test vocabulary (dataset name, string, file, list); see `set_vocabulary`.
            vocabulary_dataset: the dataset `vocabulary` is given for (its thing flags; see `OpenVocabModel`).
            out_vocab, out_vocab_logit_scale, ensemble_alpha, ensemble_beta: out-of-vocabulary classifier and
                the geometric ensemble (alpha: seen classes, beta: unseen).
            ensemble_on_valid_mask: queries whose binarised mask has no cell on the CLIP grid are classified
                by the in-vocabulary classifier alone (FC-CLIP's ADE20K setting).
            synonyms: "max" (a class's logit is the max over its synonyms' logits, FC-CLIP) or "mean" (one
                embedding per class, the synonyms' mean), in training and inference alike.
            soft_mask_pooling: pool CLIP features weighted by the mask probabilities instead of over the
                binarised masks (FC-CLIP).
            semantic_on, panoptic_on, instance_on: which outputs inference returns.
            semantic_resolution: where `sem_seg` combines the query masks: "output" (every query's mask resized
                to the output first), "padded" (sigmoid at the padded input size, the class scores cropped and
                resized), "auto" (FC-CLIP: "output" when panoptic or instance inference is on, else "padded")
                or "mask" (on the mask grid, then the class scores resized: cheapest).
            object_mask_threshold, overlap_threshold: panoptic post-processing.
            detections_per_image: instance top-k.
            vild_head: ViLD-image's head (None: off; the criterion then needs no "clip_embeds").
            vild_target: the teacher's view of a segment, "crop" (its box through CLIP's image encoder) or
                "mask_pool" (the frozen `clip_dense` averaged over it).
            vild_crop_scales, vild_crop_size: ("crop") box enlargements and the crop side.
            vild_distill_into_decoder: the distillation's gradient reaches the query embedding (else the head only).
            vild_ensemble, vild_ensemble_alpha, vild_ensemble_beta: ViLD's ensemble at inference and its weights
                of the image head on seen / unseen classes (`vild_ensemble`).
            sem_seg_output: "scores" ((C, H, W)) or "labels" ((H, W) int64 argmax, banded: `semantic_labels`;
                resolution "output" or "mask", and "auto" means "output").
        """
        super().__init__(backbone=backbone, text_classifier=text_classifier, pixel_mean=pixel_mean,
                         pixel_std=pixel_std, vocabulary=vocabulary, vocabulary_dataset=vocabulary_dataset,
                         train_vocabulary=train_vocabulary, sem_seg_output=sem_seg_output)
        if sem_seg_output == "labels" and semantic_resolution == "padded":
            raise ValueError("MODEL.SEM_SEG_OUTPUT='labels' is computed at SEMANTIC_RESOLUTION 'output' or 'mask' "
                             "('auto' = 'output'); 'padded' holds (C, H, W) scores at the padded input size")
        if train_vocabulary is not None:
            self.train_vocabulary  # noqa: B018 - parsed now: a bad training vocabulary fails at build time
        if not (semantic_on or panoptic_on or instance_on):
            raise ValueError("MODEL.MASK_SEG.TEST: turn on at least one of SEMANTIC_ON, PANOPTIC_ON, INSTANCE_ON")
        if semantic_resolution not in ("auto", "output", "padded", "mask"):
            raise ValueError(f"MODEL.MASK_SEG.TEST.SEMANTIC_RESOLUTION={semantic_resolution!r}; "
                             "use 'auto', 'output', 'padded' or 'mask'")
        if synonyms not in ("max", "mean"):
            raise ValueError(f"MODEL.MASK_SEG.CLASSIFIER.SYNONYMS={synonyms!r}; use 'max' or 'mean'")
        for name, v in (("ENSEMBLE_ALPHA", ensemble_alpha), ("ENSEMBLE_BETA", ensemble_beta)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"MODEL.MASK_SEG.CLASSIFIER.{name}={v} must be in [0, 1]")
        if vild_target not in ("crop", "mask_pool"):
            raise ValueError(f"MODEL.MASK_SEG.VILD.TARGET={vild_target!r}; use 'crop' or 'mask_pool'")
        if not vild_crop_scales or min(vild_crop_scales) <= 0 or vild_crop_size < 1:
            raise ValueError(f"MODEL.MASK_SEG.VILD: CROP_SCALES={list(vild_crop_scales)} must be positive (at least "
                             f"one) and CROP_SIZE={vild_crop_size} at least 1")
        for name, v in (("ENSEMBLE_ALPHA", vild_ensemble_alpha), ("ENSEMBLE_BETA", vild_ensemble_beta)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"MODEL.MASK_SEG.VILD.{name}={v} must be in [0, 1]")
        self.vild_head = vild_head
        self.vild_target = vild_target
        self.vild_crop_scales = tuple(float(x) for x in vild_crop_scales)
        self.vild_crop_size = vild_crop_size
        self.vild_distill_into_decoder = vild_distill_into_decoder
        self.vild_ensemble = vild_ensemble
        self.vild_ensemble_alpha, self.vild_ensemble_beta = vild_ensemble_alpha, vild_ensemble_beta
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.criterion = criterion
        self.in_vocab = in_vocab
        self.out_vocab = out_vocab
        self.out_vocab_logit_scale = out_vocab_logit_scale
        self.ensemble_alpha = ensemble_alpha
        self.ensemble_beta = ensemble_beta
        self.ensemble_on_valid_mask = ensemble_on_valid_mask
        self.synonyms = synonyms
        self.soft_mask_pooling = soft_mask_pooling
        self.semantic_on, self.panoptic_on, self.instance_on = semantic_on, panoptic_on, instance_on
        self.semantic_resolution = semantic_resolution
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.detections_per_image = detections_per_image

    @classmethod
    def output_tasks(cls, cfg) -> Tuple[str, ...]:
        """The detectron2 outputs produced at test time (they pick the evaluators)."""
        t = cfg.MODEL.MASK_SEG.TEST
        return tuple(k for k, on in (("sem_seg", t.SEMANTIC_ON), ("panoptic_seg", t.PANOPTIC_ON),
                                     ("instances", t.INSTANCE_ON)) if on)

    @classmethod
    def from_config(cls, cfg):
        cls.check_training_sets(cfg)  # user errors before CLIP is loaded
        for name in cfg.DATASETS.TEST:
            registered_dataset(name, "DATASETS.TEST")
        clip = cls.clip_parts(cfg)
        backbone = clip["backbone"]
        pixel_decoder = build_pixel_decoder(cfg, backbone.output_shape())
        pd, ms, clf = cfg.MODEL.MASK_SEG.PIXEL_DECODER, cfg.MODEL.MASK_SEG, cfg.MODEL.MASK_SEG.CLASSIFIER
        vild = ms.VILD
        if ms.DECODER.NUM_LEVELS > len(pd.PYRAMID_SCALES) - 1:
            raise ValueError(f"MODEL.MASK_SEG.DECODER.NUM_LEVELS={ms.DECODER.NUM_LEVELS}, but the pixel decoder has "
                             f"only {len(pd.PYRAMID_SCALES) - 1} levels besides the mask features")
        return {
            **clip,
            **cls.vocabulary_args(cfg),
            **cls.sem_seg_args(cfg),
            "train_vocabulary": cls.training_vocabulary_spec(cfg),
            "pixel_decoder": pixel_decoder,
            "transformer_decoder": build_transformer_decoder(cfg, pd.CONV_DIM, pd.MASK_DIM, backbone.embed_dim),
            "criterion": SetCriterion(cfg),
            "in_vocab": InVocabClassifier(backbone.embed_dim, clf.LOGIT_SCALE, clf.LEARN_LOGIT_SCALE),
            "out_vocab": clf.OUT_VOCAB,
            "out_vocab_logit_scale": clf.OUT_VOCAB_LOGIT_SCALE,
            "ensemble_alpha": clf.ENSEMBLE_ALPHA,
            "ensemble_beta": clf.ENSEMBLE_BETA,
            "ensemble_on_valid_mask": clf.ENSEMBLE_ON_VALID_MASK,
            "synonyms": clf.SYNONYMS,
            "soft_mask_pooling": clf.SOFT_MASK_POOLING,
            "semantic_on": ms.TEST.SEMANTIC_ON,
            "panoptic_on": ms.TEST.PANOPTIC_ON,
            "instance_on": ms.TEST.INSTANCE_ON,
            "semantic_resolution": ms.TEST.SEMANTIC_RESOLUTION,
            "object_mask_threshold": ms.TEST.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": ms.TEST.OVERLAP_THRESHOLD,
            "detections_per_image": ms.TEST.DETECTIONS_PER_IMAGE,
            "vild_head": ImageEmbeddingHead(backbone.embed_dim, vild.HEAD_LAYERS, vild.IMAGE_LOGIT_SCALE)
            if vild.ENABLED else None,
            "vild_target": vild.TARGET,
            "vild_crop_scales": list(vild.CROP_SCALES),
            "vild_crop_size": vild.CROP_SIZE,
            "vild_distill_into_decoder": vild.DISTILL_INTO_DECODER,
            "vild_ensemble": vild.ENSEMBLE,
            "vild_ensemble_alpha": vild.ENSEMBLE_ALPHA,
            "vild_ensemble_beta": vild.ENSEMBLE_BETA,
        }

    # ---- forward pieces ---------------------------------------------------------------------------------
    def preprocess(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise and pad (bottom / right, to the patch size) into one batch; images at least a patch."""
        return super().preprocess(batched_inputs, min_size=self.backbone.patch_size)

    def encode(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Backbone features; no autograd graph through the CLIP tower when none of it is trainable."""
        frozen = not any(p.requires_grad for p in self.backbone.parameters())
        with torch.no_grad() if frozen else nullcontext():
            return self.backbone(images)

    def text_embeddings(self, vocabulary: Vocabulary) -> ClassText:
        """Both classifiers' text side: a row per synonym (max over a class's synonyms) or per class (the
        synonyms' mean embedding), as `synonyms` says; cached per class by the text classifier."""
        embeds, owner = self.text_queries(vocabulary, self.synonyms)
        return ClassText(embeds, len(vocabulary), owner)

    def prepare_targets(self, batched_inputs: List[Dict], padded_size: Tuple[int, int]) -> List[Dict]:
        targets = []
        for inp in batched_inputs:
            if "instances" not in inp:
                raise ValueError("training needs per-image 'instances' (gt_classes, gt_masks): set "
                                 "INPUT.DATASET_MAPPER_NAME to 'mask_semantic' or 'mask_panoptic_lsj'")
            inst = inp["instances"].to(self.device)
            masks = inst.gt_masks.tensor if isinstance(inst.gt_masks, BitMasks) else inst.gt_masks
            h, w = masks.shape[-2:]
            padded = masks.new_zeros((masks.shape[0], *padded_size))
            padded[:, :h, :w] = masks
            labels = inst.gt_classes.long()
            if len(labels) and labels.max() >= len(self.train_vocabulary):
                raise ValueError(f"label {int(labels.max())} outside the training vocabulary of "
                                 f"{len(self.train_vocabulary)} classes")
            targets.append({"labels": labels, "masks": padded})
        return targets

    @torch.no_grad()
    def segment_embeddings(self, targets: List[Dict], images: ImageList, dense: torch.Tensor) -> List[torch.Tensor]:
        """ViLD-image's teacher: per image (N_i, D) L2-normalised frozen CLIP embeddings of its target segments.

        "crop": each segment's box (clipped to the image's own pixels, enlarged by every crop scale) is cut from
        the normalised input (normalising commutes with the bilinear resampling) and resized to a square for
        CLIP's image encoder; per segment the scales' normalised embeddings are summed, then normalised (ViLD's
        1x + 1.5x ensemble). "mask_pool": `dense` (B, D, h, w) averaged over each segment's mask."""
        if self.vild_target == "mask_pool":
            return [F.normalize(pool_masks(dense[i:i + 1].float(), t["masks"][None].float())[0], dim=-1)
                    for i, t in enumerate(targets)]
        boxes = []
        for t, (h, w) in zip(targets, images.image_sizes):
            tight = BitMasks(t["masks"].bool()).get_bounding_boxes().tensor  # (N_i, 4) xyxy
            boxes.append(torch.stack([scale_boxes(tight, s, h, w) for s in self.vild_crop_scales], 1))  # (N_i, S, 4)
        crops = crop_boxes(images.tensor, [b.flatten(0, 1) for b in boxes], self.vild_crop_size)  # (N * S, 3, s, s)
        embeds = F.normalize(self.backbone.encode_image(crops).float(), dim=-1) if len(crops) else \
            crops.new_zeros((0, self.backbone.embed_dim), dtype=torch.float32)
        embeds = F.normalize(embeds.view(-1, len(self.vild_crop_scales), embeds.shape[-1]).sum(1), dim=-1)
        return list(embeds.split([len(b) for b in boxes]))

    def losses(self, outputs: Dict, batched_inputs: List[Dict], images: ImageList,
               features: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """The criterion's weighted losses; `features` (the backbone's) are needed with ViLD-image."""
        if self.train_vocabulary is None:
            raise ValueError("no training vocabulary: set DATASETS.TRAIN or MODEL.MASK_SEG.TRAIN_VOCABULARY")
        text = self.text_embeddings(self.train_vocabulary)

        def classify(o):
            out = {"pred_logits": self.in_vocab(o["pred_embeds"], text), "pred_masks": o["pred_masks"]}
            if self.vild_head is not None:
                embeds = o["pred_embeds"] if self.vild_distill_into_decoder else o["pred_embeds"].detach()
                out["pred_image_embeds"] = self.vild_head(embeds)
            return out

        outs = classify(outputs)
        outs["aux_outputs"] = [classify(a) for a in outputs["aux_outputs"]]
        targets = self.prepare_targets(batched_inputs, tuple(images.tensor.shape[-2:]))
        if self.vild_head is not None:
            for t, e in zip(targets, self.segment_embeddings(targets, images, features["clip_dense"])):
                t["clip_embeds"] = e
        return self.criterion(outs, targets)

    def class_probabilities(self, embeds: torch.Tensor, mask_logits: torch.Tensor, dense: torch.Tensor,
                            images: ImageList, text: ClassText, seen: Optional[torch.Tensor] = None
                            ) -> torch.Tensor:
        """(B, Q, C + 1) class probabilities (last = void) from the ensemble of both classifiers, given the
        queries' (B, Q, D) class embeddings and (B, Q, h, w) mask logits on the mask grid of the padded batch.
        With ViLD's ensemble, its scores stand for the in-vocabulary classifier's (not renormalised when it is
        the only classifier, as ViLD ranks them)."""
        in_logits = self.in_vocab(embeds, text)
        if self.vild_head is not None and self.vild_ensemble:
            seen = self.seen if seen is None else seen
            image_logits = self.vild_head.logits(self.vild_head(embeds), text)
            # ViLD's scores (log) take the in-vocabulary classifier's place, also inside FC-CLIP's ensemble below
            in_logits = vild_ensemble(in_logits, image_logits, seen, self.vild_ensemble_alpha, self.vild_ensemble_beta)
            if not self.out_vocab:
                return in_logits.exp()  # ViLD's own scores, not renormalised
        if not self.out_vocab:
            return in_logits.float().softmax(-1)
        mask_logits = mask_logits.float()
        # pool only over each image's own pixels, not the batch padding (FC-CLIP evaluates one image at a time)
        on_clip_grid = F.interpolate(mask_logits, size=dense.shape[-2:], mode="bilinear", align_corners=False)
        on_clip_grid = on_clip_grid.masked_fill(~image_cells(images, dense.shape[-2:]), -1.0)  # padding: background
        valid = (on_clip_grid > 0).flatten(2).any(-1) if self.ensemble_on_valid_mask else None  # (B, Q)
        if self.soft_mask_pooling:
            inside = image_cells(images, mask_logits.shape[-2:])
            out_logits = out_of_vocab_logits(dense, mask_logits.sigmoid() * inside, text, self.out_vocab_logit_scale)
        else:
            out_logits = out_of_vocab_logits(dense, on_clip_grid, text, self.out_vocab_logit_scale, binary=True)
        seen = self.seen if seen is None else seen
        return geometric_ensemble(in_logits, out_logits, seen, self.ensemble_alpha, self.ensemble_beta, valid)

    def postprocess(self, probs: torch.Tensor, mask_logits: torch.Tensor, padded_size: Tuple[int, int],
                    image_size: Tuple[int, int], height: int, width: int) -> Dict:
        """One image: (Q, C + 1) probabilities and (Q, h, w) mask logits on the mask grid of the padded input
        -> detectron2 output dict at (height, width)."""
        masks = OutputMasks(mask_logits, padded_size, image_size, (height, width))  # resized per query, on demand
        result = {}
        if self.semantic_on:
            result["sem_seg"] = semantic_scores(probs, mask_logits, padded_size, image_size, (height, width),
                                                self.semantic_resolution, self.panoptic_on or self.instance_on,
                                                labels=self.sem_seg_output == "labels")
        is_thing = self.is_thing.to(masks.device)
        if self.panoptic_on:
            result["panoptic_seg"] = panoptic_inference(probs, masks, is_thing, self.object_mask_threshold,
                                                        self.overlap_threshold)
        if self.instance_on:
            result["instances"] = instance_inference(probs, masks, is_thing, self.detections_per_image)
        return result

    def predict(self, images: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], Dict]:
        """(B, 3, H, W) normalised padded images -> (backbone features, the decoder's outputs: "pred_masks"
        (B, Q, h, w) mask logits on the mask grid, "pred_embeds" (B, Q, D), "aux_outputs")."""
        features = self.encode(images)
        mask_features, multi_scale = self.pixel_decoder(features)
        return features, self.transformer_decoder(multi_scale, mask_features)

    def segment(self, images: torch.Tensor, text: Union[torch.Tensor, ClassText], owner: Optional[torch.Tensor] = None,
                image_sizes: Optional[Sequence[Tuple[int, int]]] = None, seen: Optional[torch.Tensor] = None
                ) -> Dict[str, torch.Tensor]:
        """The tensor-only inference core (export, other front-ends): masks and their class probabilities.

        Args:
            images: (B, 3, H, W) normalised images, H and W multiples of the patch size.
            text: (S, D) normalised text embeddings; owner: (S,) the class of each row (None: a row per class);
                or both as `ClassText` (its class count known without reading `owner`, as export needs).
            image_sizes: each image's own (h, w) inside the padded batch; default: all (H, W).
            seen: (C,) bool seen classes (ensemble weights); default: the current vocabulary's `seen`.
            num_classes: C, when known (saves reading `owner` back from the device); default: from owner / text.
        Returns:
            "pred_masks": (B, Q, h, w) float32 mask logits on the mask grid (H/4, W/4 of the padded input);
            "class_probs": (B, Q, C + 1) probabilities of the ensemble of both classifiers (last = void).
        """
        sizes = [tuple(s) for s in image_sizes] if image_sizes is not None else [tuple(images.shape[-2:])] * len(images)
        if not isinstance(text, ClassText):
            text = ClassText(text, int(owner.max()) + 1 if owner is not None else len(text), owner)
        features, outputs = self.predict(images)
        mask_logits = outputs["pred_masks"].float()  # post-processing in fp32, also after bf16 / fp16 autocast
        probs = self.class_probabilities(outputs["pred_embeds"], mask_logits, features["clip_dense"],
                                         ImageList(images, sizes), text, seen)
        return {"pred_masks": mask_logits, "class_probs": probs}

    def forward(self, batched_inputs: List[Dict]):
        """Training: dict of losses. Inference: per image {"sem_seg", "panoptic_seg", "instances"} (as enabled)."""
        images = self.preprocess(batched_inputs)
        if self.training:
            features, outputs = self.predict(images.tensor)
            return self.losses(outputs, batched_inputs, images, features)
        text = self.text_embeddings(self.vocabulary)
        out = self.segment(images.tensor, text, image_sizes=images.image_sizes)
        probs, mask_logits = out["class_probs"], out["pred_masks"]
        results = []
        for i, inp in enumerate(batched_inputs):
            h, w = images.image_sizes[i]
            results.append(self.postprocess(probs[i], mask_logits[i], tuple(images.tensor.shape[-2:]), (h, w),
                                            inp.get("height", h), inp.get("width", w)))
        return results
