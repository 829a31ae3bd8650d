"""Training-free open-vocabulary semantic segmentation straight from CLIP's dense features."""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ..backbone.clip_vit import CLIPViTDenseEncoder
from ..clip_model import load_open_clip, split_clip
from ..pamr import PAMR
from ..text import TextClassifier, Vocabulary, parse_vocabulary

logger = logging.getLogger(__name__)


def sliding_windows(size: Tuple[int, int], window: int, stride: int) -> List[Tuple[int, int, int, int]]:
    """(y0, x0, y1, x1) windows covering an (H, W) image; the last row/column is flush with the border.
    A window larger than the image shrinks to the image."""
    if window <= 0 or stride <= 0:
        raise ValueError(f"window ({window}) and stride ({stride}) must be positive")
    out = []
    h, w = size
    wh, ww = min(window, h), min(window, w)
    ys = list(range(0, h - wh + 1, stride))
    xs = list(range(0, w - ww + 1, stride))
    ys += [h - wh] if ys[-1] != h - wh else []
    xs += [w - ww] if xs[-1] != w - ww else []
    for y in ys:
        for x in xs:
            out.append((y, x, y + wh, x + ww))
    return out


@META_ARCH_REGISTRY.register()
class CLIPDenseSegmentor(nn.Module):
    """Per-pixel logits = scale * <clip_dense, class text embedding>, upsampled to the input.

    No trainable parameters: any CLIP / CLIPSelf checkpoint runs as is. Output per image:
    ``{"sem_seg": (C, height, width)}`` class probabilities, the format `SemSegEvaluator` reads.
    """

    @configurable
    def __init__(self, *, backbone: CLIPViTDenseEncoder, text_classifier: TextClassifier,
                 pixel_mean: Tuple[float, ...], pixel_std: Tuple[float, ...], vocabulary=None,
                 logit_scale: float = 100.0, inference_mode: str = "whole", window_size: int = 448,
                 window_stride: int = 224, bg_threshold: float = 0.0, background_class: str = "background",
                 pamr: Optional[PAMR] = None):
        """
        Args:
            backbone: the CLIP dense encoder.
            text_classifier: the frozen text tower (same CLIP model).
            pixel_mean, pixel_std: per-channel normalisation of the 0-255 RGB input.
            vocabulary: initial vocabulary (anything `parse_vocabulary` accepts); `set_vocabulary` changes it.
            logit_scale: multiplier of the cosine similarities before the softmax.
            inference_mode: "whole" or "slide".
            window_size, window_stride: sliding-window geometry in input pixels (rounded down to multiples of the
                patch size, so that windows share one patch grid and their logits add up at feature resolution).
            bg_threshold: pixels whose highest class probability is below it go to `background_class`; 0 = off.
            background_class: display name of the vocabulary's background class (needed when bg_threshold > 0).
            pamr: optional PAMR refinement of the logits with the image.
        """
        super().__init__()
        if inference_mode not in ("whole", "slide"):
            raise ValueError(f"MODEL.DENSE_SEG.INFERENCE_MODE={inference_mode!r}; use 'whole' or 'slide'")
        self.backbone = backbone
        self.text_classifier = text_classifier
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.logit_scale = logit_scale
        self.inference_mode = inference_mode
        self.window_size = window_size
        self.window_stride = window_stride
        self.bg_threshold = bg_threshold
        self.background_class = background_class
        self.pamr = pamr
        self._vocabulary: Optional[Vocabulary] = None
        self._vocabulary_spec = vocabulary

    @classmethod
    def from_config(cls, cfg):
        visual, text_model = split_clip(load_open_clip(cfg.MODEL.CLIP.MODEL_NAME, cfg.MODEL.CLIP.PRETRAINED))
        vocabulary = cfg.MODEL.TEXT.VOCABULARY or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
        return {
            "backbone": CLIPViTDenseEncoder(cfg, visual=visual),
            "text_classifier": TextClassifier(cfg, text_model=text_model),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "vocabulary": vocabulary,
            "logit_scale": cfg.MODEL.DENSE_SEG.LOGIT_SCALE,
            "inference_mode": cfg.MODEL.DENSE_SEG.INFERENCE_MODE,
            "window_size": cfg.MODEL.DENSE_SEG.WINDOW_SIZE,
            "window_stride": cfg.MODEL.DENSE_SEG.WINDOW_STRIDE,
            "bg_threshold": cfg.MODEL.DENSE_SEG.BG_THRESHOLD,
            "background_class": cfg.MODEL.DENSE_SEG.BACKGROUND_CLASS,
            "pamr": PAMR(cfg.MODEL.DENSE_SEG.PAMR_ITERS, cfg.MODEL.DENSE_SEG.PAMR_DILATIONS)
            if cfg.MODEL.DENSE_SEG.PAMR_ITERS > 0 else None,
        }

    @classmethod
    def output_tasks(cls, cfg) -> Tuple[str, ...]:
        """The detectron2 output keys this model produces (picks the evaluators)."""
        return ("sem_seg",)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def vocabulary(self) -> Vocabulary:
        if self._vocabulary is None:
            if self._vocabulary_spec is None:
                raise ValueError("no vocabulary: set MODEL.TEXT.VOCABULARY, DATASETS.TEST, or call set_vocabulary()")
            self._vocabulary = parse_vocabulary(self._vocabulary_spec)
        return self._vocabulary

    def set_vocabulary(self, vocabulary) -> Vocabulary:
        """Switch the classes to segment (a string, file, list or dataset name); no rebuild needed."""
        self._vocabulary = parse_vocabulary(vocabulary)
        return self._vocabulary

    def low_res_logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images, H and W multiples of the patch size -> (B, C, H/p, W/p) logits."""
        dense = self.backbone(images)["clip_dense"]  # (B, D, H/p, W/p)
        return self.logit_scale * torch.einsum("bdhw,cd->bchw", dense, text.to(dense.dtype)).float()

    def _window_logits(self, padded: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Sliding windows over a padded (3, Hp, Wp) image, averaged at feature resolution: (C, Hp/p, Wp/p)."""
        p = self.backbone.patch_size
        window = max(p, self.window_size // p * p)
        stride = max(p, self.window_stride // p * p)
        hp, wp = padded.shape[-2:]
        logits = padded.new_zeros((text.shape[0], hp // p, wp // p), dtype=torch.float32)
        count = padded.new_zeros((1, hp // p, wp // p), dtype=torch.float32)
        for y0, x0, y1, x1 in sliding_windows((hp, wp), window, stride):  # all multiples of p
            logits[:, y0 // p:y1 // p, x0 // p:x1 // p] += self.low_res_logits(padded[None, :, y0:y1, x0:x1], text)[0]
            count[:, y0 // p:y1 // p, x0 // p:x1 // p] += 1
        return logits.div_(count)

    def segment(self, image: torch.Tensor, text: torch.Tensor, out_size: Optional[Tuple[int, int]] = None
                ) -> torch.Tensor:
        """(3, H, W) normalised image -> (C, out_h, out_w) class probabilities (default out size: H, W).

        Logits are computed, and for sliding windows accumulated, at feature resolution, then upsampled once,
        straight to the output size: the only full-resolution (C, out_h, out_w) tensor made (PAMR adds one).
        """
        h, w = image.shape[-2:]
        out_h, out_w = out_size or (h, w)
        padded = self.backbone.pad(image[None])[0]  # (3, Hp, Wp)
        if self.inference_mode == "whole":
            low = self.low_res_logits(padded[None], text)[0]
        else:
            low = self._window_logits(padded, text)
        # the padded map is scaled like the image, then the padding is cut off
        hp, wp = padded.shape[-2:]
        size = (max(out_h, round(hp * out_h / h)), max(out_w, round(wp * out_w / w)))
        logits = F.interpolate(low[None], size=size, mode="bilinear", align_corners=False)[0, :, :out_h, :out_w]
        if self.pamr is not None:
            rgb = F.interpolate(image[None].float(), size=(out_h, out_w), mode="bilinear", align_corners=False)
            logits = self.pamr(rgb, logits[None])[0]
        probs = logits.sub_(logits.amax(0, keepdim=True)).exp_()  # in-place softmax over classes
        probs = probs.div_(probs.sum(0, keepdim=True))
        if self.bg_threshold > 0:
            bg = self._background_index()
            uncertain = probs.amax(0) < self.bg_threshold  # (out_h, out_w)
            probs.masked_fill_(uncertain[None], 0.0)
            probs[bg].masked_fill_(uncertain, 1.0)
        return probs

    def _background_index(self) -> int:
        names = [n.lower() for n in self.vocabulary.names]
        if self.background_class.lower() not in names:
            raise ValueError(
                f"MODEL.DENSE_SEG.BG_THRESHOLD={self.bg_threshold} needs a class named "
                f"{self.background_class!r} (MODEL.DENSE_SEG.BACKGROUND_CLASS) in the vocabulary: "
                f"{self.vocabulary.names}"
            )
        return names.index(self.background_class.lower())

    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, torch.Tensor]]:
        if self.training:
            raise RuntimeError("CLIPDenseSegmentor is training-free: use it with --eval-only or the demo")
        text = self.text_classifier(self.vocabulary)  # (C, D)
        results = []
        for inp in batched_inputs:
            image = inp["image"].to(self.device)
            if image.shape[0] != 3:
                raise ValueError(f"expected a 3-channel image, got shape {tuple(image.shape)}")
            h, w = image.shape[-2:]
            if min(h, w) < 1:
                raise ValueError(f"empty image of shape {tuple(image.shape)}")
            normed = (image.float() - self.pixel_mean) / self.pixel_std
            results.append({"sem_seg": self.segment(normed, text, (inp.get("height", h), inp.get("width", w)))})
        return results
