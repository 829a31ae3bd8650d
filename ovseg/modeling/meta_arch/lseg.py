"""LSeg (Li et al., ICLR 2022, "Language-driven Semantic Segmentation"): a trainable dense image encoder maps every
pixel into the frozen CLIP text space; a pixel's logit for a class is a fixed temperature times the cosine between its
embedding and the class name's text embedding, so any list of names can be segmented after training.

Details follow the authors' code (github.com/isl-org/lang-seg, modules/models/lseg_net.py, commit
bb00b219f82dc1a18a01f9b0b647bae1d41f3aeb): the DPT decoder (`DPTDecoder`) ends in a 1x1 conv to the text width; the
logit scale is exp(log(1 / 0.07)), a constant (LSeg's `logit_scale` is the exponential of a parameter, a plain
tensor the optimizer never sees); the optional spatial regularisation blocks act on the logits at the decoder's
stride, then a bilinear x2 (align_corners=True) gives full resolution; the loss is cross-entropy with an ignore label.
Ours differs where the house does: the image encoder is our CLIP ViT (LSeg: an ImageNet ViT from timm, with the CLIP
text tower beside it), class-token readout "ignore", and CLIP's pixel normalisation.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList
from torch import nn

from ..backbone.clip_vit import CLIPViTDenseEncoder
from ..pixel_decoder.dpt import DPTDecoder
from ..postprocessing import resize_to_output
from ..text import TextClassifier
from .base import OpenVocabModel

REGULARIZATION_KINDS = ("none", "depthwise", "bottleneck")  # LSeg's --arch_option 0, 2, 1
ACTIVATIONS = {"relu": nn.ReLU, "lrelu": nn.LeakyReLU, "tanh": nn.Tanh}


class SharedDepthwiseConv(nn.Module):
    """LSeg's "depthwise" convolution: one 3x3 filter (with bias) applied to every class map alike, so the block
    works for any number of classes and treats them all the same (equivariant to the label set's order)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        return self.conv(x.reshape(b * c, 1, h, w)).reshape(b, c, h, w)


class SpatialRegularization(nn.Module):
    """LSeg's spatial regularisation of the (B, C, H, W) logits: one block applied `depth` times (the same weights
    each time, as LSeg repeats its one `head_block`), the activation after every application but the last.

    depthwise:  x <- act(dwconv(x));
    bottleneck: x <- act(dwconv(x) + max over classes of x) (the max broadcast over the class axis).
    """

    def __init__(self, kind: str, depth: int, activation: str = "lrelu"):
        super().__init__()
        if kind not in ("depthwise", "bottleneck"):
            raise ValueError(f"MODEL.LSEG.BLOCK_KIND={kind!r}; use one of {list(REGULARIZATION_KINDS)}")
        if depth < 1:
            raise ValueError(f"MODEL.LSEG.BLOCK_DEPTH={depth}: a {kind} block needs depth >= 1 (or BLOCK_KIND none)")
        if activation not in ACTIVATIONS:
            raise ValueError(f"MODEL.LSEG.BLOCK_ACTIVATION={activation!r}; use one of {sorted(ACTIVATIONS)}")
        self.kind, self.depth = kind, depth
        self.conv = SharedDepthwiseConv()
        self.activation = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) logits -> (B, C, H, W) regularised logits."""
        for i in range(self.depth):
            y = self.conv(x)
            if self.kind == "bottleneck":
                y = y + x.amax(dim=1, keepdim=True)
            x = self.activation(y) if i < self.depth - 1 else y
        return x


def build_spatial_regularization(kind: str, depth: int, activation: str) -> Optional[SpatialRegularization]:
    """The block MODEL.LSEG.BLOCK_KIND names, or None for "none"."""
    if kind not in REGULARIZATION_KINDS:
        raise ValueError(f"MODEL.LSEG.BLOCK_KIND={kind!r}; use one of {list(REGULARIZATION_KINDS)}")
    return None if kind == "none" else SpatialRegularization(kind, depth, activation)


def pixel_text_logits(pixels: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """scale * cos(pixel embedding, text embedding): (B, D, H, W) and (C, D) -> (B, C, H, W)."""
    return scale * torch.einsum("bdhw,cd->bchw", F.normalize(pixels, dim=1), F.normalize(text, dim=-1))


@META_ARCH_REGISTRY.register()
class LSegSegmentor(OpenVocabModel):
    """LSeg: CLIP ViT features -> DPT decoder -> per-pixel CLIP-space embeddings -> temperature x cosine with the
    class names' text embeddings -> (optional) spatial regularisation -> x2 upsampling.

    Training: pixel-wise cross-entropy over the training vocabulary, labels from `sem_seg`. Inference: detectron2's
    `sem_seg` (class probabilities) for the current vocabulary, seen or not.
    """

    TRAIN_VOCABULARY_SECTION = "LSEG"

    @configurable
    def __init__(self, *, backbone: CLIPViTDenseEncoder, text_classifier: TextClassifier, decoder: DPTDecoder,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float], logit_scale: float = 1 / 0.07,
                 regularization: Optional[nn.Module] = None, ignore_value: int = 255, train_vocabulary=None,
                 vocabulary=None, vocabulary_dataset: Optional[str] = None):
        """
        Args:
            backbone, text_classifier: the CLIP towers; the text tower stays frozen (MODEL.TEXT.TRAINABLE False).
            decoder: the DPT decoder over the backbone's block outputs.
            pixel_mean, pixel_std: normalisation of the 0-255 RGB input.
            logit_scale: the fixed temperature multiplying the cosines (LSeg: 1 / 0.07).
            regularization: LSeg's spatial regularisation of the logits (`SpatialRegularization`), or None.
            ignore_value: label of pixels left out of the loss.
            train_vocabulary: classes of the training data (labels index it).
            vocabulary, vocabulary_dataset: the initial test vocabulary (see `OpenVocabModel`).
        """
        super().__init__(backbone=backbone, text_classifier=text_classifier, pixel_mean=pixel_mean,
                         pixel_std=pixel_std, vocabulary=vocabulary, vocabulary_dataset=vocabulary_dataset,
                         train_vocabulary=train_vocabulary)
        if train_vocabulary is not None:
            self.train_vocabulary  # noqa: B018 - parsed now: a bad training vocabulary fails at build time
        if logit_scale <= 0:
            raise ValueError(f"MODEL.LSEG.LOGIT_SCALE={logit_scale} must be positive")
        read = [b for k, b in enumerate(backbone.feature_blocks) if f"res{k + 2}" in decoder.in_features]
        idle = [i for i, blk in enumerate(backbone.tower.blocks)
                if i > max(read) and any(p.requires_grad for p in blk.parameters())]
        if idle:
            # blocks after the last decoded one feed only `clip_dense`, which LSeg does not use: they would not train
            raise ValueError(f"blocks {idle} are unlocked (MODEL.CLIP.UNLOCK_LAST_BLOCKS / UNLOCK_PATTERNS) but "
                             f"come after the last block the decoder reads ({max(read)}); add them to "
                             "MODEL.CLIP.FEATURE_BLOCKS / MODEL.LSEG.IN_FEATURES or unlock fewer")
        self.decoder = decoder
        # LSeg's head1: the fusion path's channels -> the CLIP text width
        self.head = nn.Conv2d(decoder.features, backbone.embed_dim, kernel_size=1)
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)), persistent=False)
        self.regularization = regularization
        self.ignore_value = ignore_value

    @classmethod
    def from_config(cls, cfg):
        ls = cfg.MODEL.LSEG
        cls.check_scores_only(cfg)
        if cfg.MODEL.TEXT.TRAINABLE:
            raise ValueError("LSeg keeps the CLIP text tower frozen: set MODEL.TEXT.TRAINABLE False")
        cls.check_training_sets(cfg)  # user errors before CLIP is loaded
        clip = cls.clip_parts(cfg)
        return {
            **clip,
            **cls.vocabulary_args(cfg),
            "train_vocabulary": cls.training_vocabulary_spec(cfg),
            "decoder": DPTDecoder(cfg, clip["backbone"].output_shape()),
            "logit_scale": ls.LOGIT_SCALE,
            "regularization": build_spatial_regularization(ls.BLOCK_KIND, ls.BLOCK_DEPTH, ls.BLOCK_ACTIVATION),
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        }

    # ---- the tensor core ------------------------------------------------------------------------------------
    def pixel_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images (multiples of the patch size) -> (B, D, h, w) unnormalised pixel
        embeddings in the CLIP space, at the decoder's stride (p / 8 with DPT's scales)."""
        frozen = not any(p.requires_grad for p in self.backbone.parameters())
        with torch.no_grad() if frozen else nullcontext():  # no graph through a fully frozen tower
            features = self.backbone(images)
        return self.head(self.decoder(features))

    def segment(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The tensor-only core: (B, 3, H, W) normalised images and (C, D) text embeddings -> (B, C, H, W) logits
        (temperature x cosine, regularised, upsampled to the input size)."""
        logits = pixel_text_logits(self.pixel_embeddings(images), text.to(images.device), self.logit_scale)
        if self.regularization is not None:
            logits = self.regularization(logits)
        # LSeg's output head: bilinear x2 with align_corners=True (to the input size itself when the grid is odd)
        return F.interpolate(logits, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=True)

    # ---- detectron2 front-end ---------------------------------------------------------------------------------
    def preprocess(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise and pad (bottom / right, to the patch size) into one batch; images at least a patch."""
        return super().preprocess(batched_inputs, min_size=self.backbone.patch_size)

    def targets(self, batched_inputs: List[Dict], images: ImageList) -> torch.Tensor:
        """(B, H, W) labels over the padded batch, padding = the ignore value."""
        if any("sem_seg" not in x for x in batched_inputs):
            raise ValueError("LSeg trains on per-pixel labels: each training input needs 'sem_seg' (a semantic "
                             "dataset with sem_seg_file_name, read by detectron2's DatasetMapper)")
        labels = ImageList.from_tensors([x["sem_seg"].to(self.device) for x in batched_inputs],
                                        size_divisibility=self.backbone.patch_size, pad_value=self.ignore_value)
        labels = labels.tensor.long()
        if labels.shape[-2:] != images.tensor.shape[-2:]:
            raise ValueError(f"sem_seg of size {tuple(labels.shape[-2:])} does not match its image "
                             f"{tuple(images.tensor.shape[-2:])} (after padding)")
        bad = (labels != self.ignore_value) & ((labels < 0) | (labels >= len(self.train_vocabulary)))
        if bad.any():
            raise ValueError(f"label {int(labels[bad][0])} is outside the training vocabulary of "
                             f"{len(self.train_vocabulary)} classes (ignore value {self.ignore_value})")
        return labels

    def forward(self, batched_inputs: List[Dict]):
        """Training: {"loss_sem_seg"}. Inference: per image {"sem_seg": (C, height, width) class probabilities}."""
        images = self.preprocess(batched_inputs)
        if self.training:
            if self.train_vocabulary is None:
                raise ValueError("no training vocabulary: set DATASETS.TRAIN or MODEL.LSEG.TRAIN_VOCABULARY")
            labels = self.targets(batched_inputs, images)
            text, _ = self.text_queries(self.train_vocabulary, "mean")
            logits = self.segment(images.tensor, text)
            return {"loss_sem_seg": F.cross_entropy(logits.float(), labels, ignore_index=self.ignore_value)}
        text, _ = self.text_queries(self.vocabulary, "mean")
        logits = self.segment(images.tensor, text).float()
        padded = tuple(images.tensor.shape[-2:])
        results = []
        for i, inp in enumerate(batched_inputs):
            h, w = images.image_sizes[i]
            out = resize_to_output(logits[i], padded, (h, w), (inp.get("height", h), inp.get("width", w)))
            results.append({"sem_seg": out.softmax(0)})
        return results
