"""CAT-Seg (Cho et al., CVPR 2024) on ovseg's CLIP encoders: cost aggregation over fine-tuned CLIP.

The rules follow the authors' code (github.com/KU-CVLAB/CAT-Seg, commit 6d3a188; cat_seg/cat_seg_model.py,
cat_seg/modeling/transformer/cat_seg_predictor.py): the image is resized to a fixed CLIP resolution; the last CLIP
block builds dense embeddings by the value path added to the class token (`DENSE_MODE` "catseg"); two intermediate
blocks' tokens, upsampled x2 and x4 by transposed convolutions, guide the decoder; the head
(`ovseg.modeling.cost_aggregation.CostAggregator`) gives one logit map per class; the loss is a per-class binary
cross-entropy against one-hot targets (ignored pixels count as all-negative, as the authors' code); the query and
value projection weights of both CLIP towers are fine-tuned at their own learning rate. Testing: a 2x2 grid of
overlapping windows over the image resized to a square, plus the whole image as a global view, averaged.

Keys of the authors' checkpoints -> ours (the head's own table: cost_aggregation.py's docstring):
    upsample1.* / upsample2.*                          -> guidance_upsample.0.* / guidance_upsample.1.*
    sem_seg_head.predictor.transformer.*               -> head.*
    sem_seg_head.predictor.clip_model.visual.*         -> backbone.tower.visual.* (OpenAI layout; their
                                                          attn.{q,k,v}_proj_weight concatenated in that order
                                                          into attn.in_proj_weight)
    sem_seg_head.predictor.clip_model.<text parts>     -> text_classifier.text_model.<same> (same q/k/v packing)
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList
from torch import nn

from ..backbone.clip_vit import CLIPViTDenseEncoder, get_dense_mode
from ..cost_aggregation import CostAggregator, shift_window_mask
from ..text import TextClassifier, Vocabulary, max_over_synonyms
from ..trainable import unlock_query_value
from .base import OpenVocabModel

logger = logging.getLogger(__name__)

INFERENCE_MODES = ("slide", "whole")
# MODEL.CATSEG.SYNONYMS: how a class with several names ("sofa|couch") is scored
SYNONYM_RULES = ("first", "mean", "max")
# classes post-processed (upsampled, merged, resized) together at test time: bounds the temporaries
_OUTPUT_CHUNK = 64


def window_origins(size: int, window: int, stride: int) -> List[int]:
    """Offsets of the windows along one side, as torch's nn.Unfold places them (no window flush with the border
    beyond what the stride reaches: the authors' geometry, 640 / 384 / 256 covers the side exactly)."""
    if window > size:
        raise ValueError(f"MODEL.CATSEG.SLIDE_WINDOW={window} exceeds the resized side {size} (SLIDE_RESIZE)")
    if stride <= 0 or (size - window) % stride:
        # pixels no window covers would be averaged over zero windows (NaN)
        raise ValueError(f"MODEL.CATSEG.SLIDE_STRIDE={stride} must be positive and divide SLIDE_RESIZE - SLIDE_WINDOW "
                         f"= {size} - {window}, so that the windows cover the resized image")
    return list(range(0, size - window + 1, stride))


@META_ARCH_REGISTRY.register()
class CATSegSegmentor(OpenVocabModel):
    """Open-vocabulary semantic segmentation by cost aggregation (see the module docstring)."""

    TRAIN_VOCABULARY_SECTION = "CATSEG"

    @configurable
    def __init__(self, *, backbone: CLIPViTDenseEncoder, text_classifier: TextClassifier,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float], head: CostAggregator,
                 clip_resolution: Sequence[int], decoder_guidance_dims: Sequence[int] = (256, 128),
                 finetune_clip: bool = True, clip_lr_multiplier: float = 0.01, synonyms: str = "first",
                 inference_mode: str = "slide", slide_resize: Sequence[int] = (640, 640), slide_window: int = 384,
                 slide_stride: int = 256, ignore_value: int = 255, **vocabulary_args):
        """
        Args:
            backbone, text_classifier, pixel_mean, pixel_std, vocabulary_args: see `OpenVocabModel`. The backbone
                must export exactly two feature blocks (the decoder's guidance, shallow first).
            head: the cost aggregation head.
            clip_resolution: (H, W) every image (window) is resized to before CLIP.
            decoder_guidance_dims: channels of the two upsampled guidance maps (x2 and x4 the feature grid).
            finetune_clip: train the q / v projection weights of both towers (`unlock_query_value`).
            clip_lr_multiplier: their learning rate as a multiple of SOLVER.BASE_LR.
            synonyms: how a class's synonyms are scored: "first" (the authors': its first name's embedding), "mean"
                (the names' embeddings averaged per template) or "max" (each name its own class channel through
                the head, the class's probability the maximum over its names': the authors' PAS-20b, where
                every prediction of one of 39 Pascal-Context names counts as background).
            inference_mode: "slide" (the authors' windows + global view) or "whole" (one resized view).
            slide_resize, slide_window, slide_stride: the sliding-window geometry in pixels.
            ignore_value: the label of unlabelled pixels.
        """
        super().__init__(backbone=backbone, text_classifier=text_classifier, pixel_mean=pixel_mean,
                         pixel_std=pixel_std, **vocabulary_args)
        if len(backbone.feature_blocks) != 2:
            raise ValueError(f"CAT-Seg needs two CLIP blocks guiding its decoder (MODEL.CLIP.FEATURE_BLOCKS, e.g. "
                             f"[3, 7] for ViT-B, [7, 15] for ViT-L); got {backbone.feature_blocks}")
        if synonyms not in SYNONYM_RULES:
            raise ValueError(f"MODEL.CATSEG.SYNONYMS={synonyms!r}; use one of {list(SYNONYM_RULES)}")
        if inference_mode not in INFERENCE_MODES:
            raise ValueError(f"MODEL.CATSEG.INFERENCE_MODE={inference_mode!r}; use one of {list(INFERENCE_MODES)}")
        if len(clip_resolution) != 2 or any(s % backbone.patch_size for s in clip_resolution):
            raise ValueError(f"MODEL.CATSEG.CLIP_RESOLUTION={list(clip_resolution)} must be two multiples of the "
                             f"patch size {backbone.patch_size}")
        self.head = head
        width = backbone.tower.width
        # the authors' upsample1 / upsample2: block tokens -> x2, x4 maps
        self.guidance_upsample = nn.ModuleList([
            nn.ConvTranspose2d(width, d, kernel_size=2 ** (j + 1), stride=2 ** (j + 1))
            for j, d in enumerate(decoder_guidance_dims)])
        self.clip_resolution = tuple(clip_resolution)
        self.finetune_clip = finetune_clip
        self.clip_lr_multiplier = clip_lr_multiplier
        self.synonyms = synonyms
        self.inference_mode = inference_mode
        self.slide_resize, self.slide_window, self.slide_stride = tuple(slide_resize), slide_window, slide_stride
        if inference_mode == "slide":
            for side in self.slide_resize:  # a geometry error now, not at the first test image
                window_origins(side, slide_window, slide_stride)
        self.ignore_value = ignore_value
        self._packed = []  # full names of packed q/k/v tensors: no weight decay (their key rows must not move)
        if finetune_clip:
            if text_classifier is None or not text_classifier.trainable:
                raise ValueError("CAT-Seg fine-tunes the text tower: build its TextClassifier with trainable=True")
            for p in text_classifier.text_model.parameters():
                p.requires_grad_(False)
            for prefix, module in (("backbone.tower.visual.", backbone.tower.visual),
                                   ("text_classifier.text_model.", text_classifier.text_model)):
                _, packed = unlock_query_value(module)
                self._packed += [prefix + n for n in packed]
            last = len(backbone.tower.blocks) - 1
            if get_dense_mode(backbone.dense_mode).mixing == "value" and last not in backbone.feature_blocks:
                # the last block's output is its value path alone: a separate query projection there would get no
                # gradient, which DDP refuses (EVA's q_proj; a packed in_proj_weight is used through its v rows)
                for m in backbone.tower.blocks[last].modules():
                    if isinstance(getattr(m, "q_proj", None), nn.Linear):
                        m.q_proj.weight.requires_grad_(False)
        self._text_cache: Optional[Tuple[tuple, torch.Tensor]] = None

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.CATSEG
        cls.check_scores_only(cfg)
        cls.check_training_sets(cfg)
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.TEXT.TRAINABLE = cfg.MODEL.TEXT.TRAINABLE or c.FINETUNE_CLIP  # fine-tuned: no cache, gradients
        clip = cls.clip_parts(cfg)
        dim = clip["backbone"].embed_dim
        head = CostAggregator(
            text_dim=dim, appearance_dim=dim, text_guidance_proj_dim=c.TEXT_GUIDANCE_PROJ_DIM,
            appearance_guidance_proj_dim=c.APPEARANCE_GUIDANCE_PROJ_DIM, decoder_dims=c.DECODER_DIMS,
            decoder_guidance_dims=c.DECODER_GUIDANCE_DIMS, decoder_guidance_proj_dims=c.DECODER_GUIDANCE_PROJ_DIMS,
            num_layers=c.NUM_LAYERS, num_heads=c.NUM_HEADS, hidden_dim=c.HIDDEN_DIM,
            pooling_size=c.POOLING_SIZE or None, window_size=c.WINDOW_SIZE, attention_type=c.ATTENTION_TYPE,
            num_prompts=len(clip["text_classifier"].templates), pad_len=c.PAD_LEN, class_chunk=c.CLASS_CHUNK,
            test_pooling_size=c.TEST_POOLING_SIZE or None, reject_topk=c.SED_TOPK)
        train = cls.training_vocabulary_spec(cfg)
        return {
            **clip, **cls.vocabulary_args(cfg), "train_vocabulary": train, "head": head,
            "clip_resolution": c.CLIP_RESOLUTION, "decoder_guidance_dims": c.DECODER_GUIDANCE_DIMS,
            "finetune_clip": c.FINETUNE_CLIP, "clip_lr_multiplier": c.CLIP_LR_MULTIPLIER, "synonyms": c.SYNONYMS,
            "inference_mode": c.INFERENCE_MODE, "slide_resize": c.SLIDE_RESIZE, "slide_window": c.SLIDE_WINDOW,
            "slide_stride": c.SLIDE_STRIDE, "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        }

    def shift_window_mask(self) -> Optional[torch.Tensor]:
        """(num_windows, window^2, window^2) the additive mask of the shifted-window blocks on this model's feature
        grid, or None when the grid has no shift. The authors' checkpoints store it; their converter checks it."""
        if not len(self.head.layers):
            return None
        grid = tuple(s // self.backbone.patch_size for s in self.clip_resolution)
        window, shift = self.head.layers[0].spatial.block_2.geometry(grid)
        return shift_window_mask(grid, window, shift) if shift else None

    # ---- optimizer ------------------------------------------------------------------------------------------
    def optimizer_overrides(self) -> Dict[str, Dict[str, float]]:
        """Per trainable CLIP parameter: its learning-rate multiplier (of SOLVER.BASE_LR) and, for packed q/k/v
        tensors, weight decay 0 (decay would move the frozen key rows). Read by the trainer's build_optimizer."""
        out = {}
        for name, p in self.named_parameters():
            if p.requires_grad and name.startswith(("backbone.", "text_classifier.")):
                out[name] = {"lr_multiplier": self.clip_lr_multiplier}
                if name in self._packed:
                    out[name]["weight_decay"] = 0.0
        return out

    # ---- text --------------------------------------------------------------------------------------------------
    def class_embeddings(self, vocabulary: Vocabulary) -> torch.Tensor:
        """(T, P, D) normalised text embeddings per prompt template, a row per class of `vocabulary` (its synonyms
        combined by "first" / "mean"; "max" embeds each name on its own: `text_channels`); with gradients while
        training, cached while testing (until the text weights change)."""
        rule = "first" if self.synonyms == "max" else self.synonyms  # "max": one-name classes (text_channels)
        if self.training and torch.is_grad_enabled():
            return self.text_classifier.template_embeddings(vocabulary, rule).to(self.device)
        params = [p for p in self.text_classifier.text_model.parameters() if p.requires_grad]
        key = (vocabulary, rule, tuple((p.data_ptr(), p._version) for p in params))
        if self._text_cache is None or self._text_cache[0] != key:
            with torch.no_grad():
                emb = self.text_classifier.template_embeddings(vocabulary, rule).to(self.device)
            self._text_cache = (key, emb)
        return self._text_cache[1]

    def text_channels(self, vocabulary: Vocabulary) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The head's class channels for `vocabulary`: (S, P, D) text embeddings and the (S,) class of each channel
        (`max_over_synonyms` merges them), or S = T channels and None. With SYNONYMS "max" every name of a class
        with several is a channel of its own, so class aggregation sees them all, as it sees a list that names them
        as classes (the authors' PAS-20b)."""
        if self.synonyms == "max" and any(len(c) > 1 for c in vocabulary.classes):
            singles, owner = vocabulary.per_synonym()
            return self.class_embeddings(singles), torch.tensor(owner, device=self.device)
        return self.class_embeddings(vocabulary), None

    # ---- the tensor core ---------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(N, 3, h, w) normalised images at the CLIP resolution -> (N, D, h/p, w/p) final patch embeddings (not
        normalised) and the two upsampled decoder-guidance maps."""
        feats, last, ctx = self.backbone.forward_tokens(images)
        emb = self.backbone.head(last[:, 1:])  # (N, h*w, D)
        emb = emb.transpose(1, 2).reshape(emb.shape[0], -1, *ctx["grid"])
        blocks = [feats[f"res{k + 2}"] for k in range(len(self.guidance_upsample))]  # shallow first
        return emb, [up(b) for up, b in zip(self.guidance_upsample, blocks)]

    def logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images (any size: resized to the CLIP resolution), (T, P, D) text ->
        (N, T, 4h, 4w) logits on the CLIP feature grid x4."""
        if tuple(images.shape[-2:]) != self.clip_resolution:
            images = F.interpolate(images, size=self.clip_resolution, mode="bilinear", align_corners=False)
        emb, guidance = self.encode(images)
        return self.head(emb, text.unsqueeze(0).expand(emb.shape[0], -1, -1, -1), emb, guidance)

    def segment(self, image: torch.Tensor, text: torch.Tensor, out_size: Optional[Tuple[int, int]] = None
                ) -> torch.Tensor:
        """(3, H, W) normalised image, (T, P, D) text -> (T, *out_size) class probabilities (sigmoid), by
        `inference_mode`."""
        out_size = tuple(out_size or image.shape[-2:])
        if self.inference_mode == "whole":
            # the one-view case of the sliding window: logits resized to the view, sigmoid, resized to the output
            logits = self.logits(image[None], text)  # (1, T, 4h, 4w)
            out = logits.new_empty((logits.shape[1], *out_size))
            for s in range(0, logits.shape[1], _OUTPUT_CHUNK):
                probs = F.interpolate(logits[:, s:s + _OUTPUT_CHUNK], size=image.shape[-2:], mode="bilinear",
                                      align_corners=False).sigmoid()
                out[s:s + _OUTPUT_CHUNK] = F.interpolate(probs, size=out_size, mode="bilinear", align_corners=False)[0]
            return out
        return self._slide(image, text, out_size)

    def _slide(self, image: torch.Tensor, text: torch.Tensor, out_size: Tuple[int, int]) -> torch.Tensor:
        rh, rw = self.slide_resize
        k, stride = self.slide_window, self.slide_stride
        resized = F.interpolate(image[None], size=(rh, rw), mode="bilinear", align_corners=False)
        boxes = [(y, x) for y in window_origins(rh, k, stride) for x in window_origins(rw, k, stride)]
        views = [resized[:, :, y:y + k, x:x + k] for y, x in boxes]
        views.append(F.interpolate(image[None], size=(k, k), mode="bilinear", align_corners=False))  # global view
        logits = self.logits(torch.cat(views), text)  # (V, T, 4h, 4w)
        count = torch.zeros((1, 1, rh, rw), device=logits.device, dtype=logits.dtype)
        for y, x in boxes:
            count[..., y:y + k, x:x + k] += 1
        out = logits.new_empty((logits.shape[1], *out_size))
        for s in range(0, logits.shape[1], _OUTPUT_CHUNK):
            probs = F.interpolate(logits[:, s:s + _OUTPUT_CHUNK], size=(k, k), mode="bilinear",
                                  align_corners=False).sigmoid()  # (V, t, k, k)
            local = probs.new_zeros((1, probs.shape[1], rh, rw))
            for (y, x), p in zip(boxes, probs[:-1]):
                local[..., y:y + k, x:x + k] += p
            glob = F.interpolate(probs[-1:], size=(rh, rw), mode="bilinear", align_corners=False)
            merged = (local / count + glob) / 2
            out[s:s + _OUTPUT_CHUNK] = F.interpolate(merged, size=out_size, mode="bilinear", align_corners=False)[0]
        return out

    # ---- detectron2 ------------------------------------------------------------------------------------------------
    def losses(self, logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per-class binary cross-entropy of (B, T, h, w) logits (upsampled to the labels) against one-hot (B, H, W)
        labels; ignored pixels are all-negative targets (the authors' rule)."""
        logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
        num_classes = logits.shape[1]
        valid = targets != self.ignore_value
        if (targets[valid] >= num_classes).any() or (targets[valid] < 0).any():
            raise ValueError(f"labels outside the {num_classes} training classes (and ignore value "
                             f"{self.ignore_value}) reached CAT-Seg's loss")
        onehot = F.one_hot(torch.where(valid, targets, 0), num_classes).permute(0, 3, 1, 2).to(logits.dtype)
        onehot = onehot * valid[:, None]
        return {"loss_sem_seg": F.binary_cross_entropy_with_logits(logits, onehot)}

    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, torch.Tensor]] | Dict[str, torch.Tensor]:
        if self.training:
            if self.train_vocabulary is None:
                raise ValueError("CAT-Seg training needs a training vocabulary: DATASETS.TRAIN or "
                                 "MODEL.CATSEG.TRAIN_VOCABULARY")
            images = self.preprocess(batched_inputs, self.backbone.patch_size)
            targets = ImageList.from_tensors([x["sem_seg"].to(self.device) for x in batched_inputs],
                                             size_divisibility=self.backbone.patch_size,
                                             pad_value=self.ignore_value).tensor
            text, owner = self.text_channels(self.train_vocabulary)
            logits = self.logits(images.tensor, text)  # (B, S, h, w)
            if owner is not None:  # sigmoid is monotonic: the max logit is the logit of the max probability
                logits = max_over_synonyms(logits, owner, len(self.train_vocabulary), dim=1)
            return self.losses(logits, targets)
        text, owner = self.text_channels(self.vocabulary)
        results = []
        for inp in batched_inputs:
            self.check_image(inp["image"])
            h, w = inp["image"].shape[-2:]
            out_size = (inp.get("height", h), inp.get("width", w))
            probs = self.segment(self.normalize(inp["image"]), text, out_size)  # (S, H, W)
            if owner is not None:
                # at the output resolution, after every resize and window average: as the authors' argmax over
                # all names, then name -> class (resizing does not commute with the max)
                probs = max_over_synonyms(probs, owner, len(self.vocabulary), dim=0)
            results.append({"sem_seg": probs})
        return results
