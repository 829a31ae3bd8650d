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
from ..clip_model import load_open_clip_from_cfg, split_clip
from ..pamr import PAMR
from ..text import TextClassifier, Vocabulary, VocabularyMixin

logger = logging.getLogger(__name__)

# Classes resized (and PAMR-refined) together: bounds the temporaries beside the one (C, H, W) output tensor
# to about this many elements (64 MB in float32), whatever the vocabulary size.
_CHUNK_ELEMENTS = 1 << 24


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


def bilinear_matrix(n_out: int, n_in: int, step: float, device=None) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D bilinear interpolation with PyTorch's align_corners=False convention:
    output sample i reads input position (i + 0.5) * step - 0.5, clamped to [0, n_in - 1].

    With step = n_in / n_out this is `F.interpolate(..., mode="bilinear", align_corners=False)` along one axis;
    a fractional step lets the output span only part of the input (the image inside a padded patch grid).
    """
    src = ((torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * step - 0.5).clamp(0, n_in - 1)
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = (src - lo).float()
    m = torch.zeros(n_out, n_in, device=device)
    rows = torch.arange(n_out, device=device)
    m.index_put_((rows, lo), 1 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m


def softmax_(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Softmax in place (no second tensor of x's size)."""
    x.sub_(x.amax(dim, keepdim=True)).exp_()
    return x.div_(x.sum(dim, keepdim=True))


@META_ARCH_REGISTRY.register()
class CLIPDenseSegmentor(VocabularyMixin, nn.Module):
    """Per-pixel logits = scale * <clip_dense, class text embedding>, upsampled to the output size.

    No trainable parameters: any CLIP / CLIPSelf checkpoint runs as is, in any `MODEL.CLIP.DENSE_MODE`
    (SCLIP / ClearCLIP / NACLIP presets: configs/trainingfree/). Output per image: ``{"sem_seg": (C, height,
    width)}`` class probabilities, the format `SemSegEvaluator` reads.

    Inference: patch-resolution logits (whole image, or sliding windows averaged on the patch grid) are upsampled
    once, straight to the output size, a chunk of classes at a time (each chunk PAMR-refined if asked); the only
    full-resolution (C, H, W) tensor is the output, made into probabilities in place.
    """

    @configurable
    def __init__(self, *, backbone: CLIPViTDenseEncoder, text_classifier: TextClassifier,
                 pixel_mean: Tuple[float, ...], pixel_std: Tuple[float, ...], vocabulary=None,
                 logit_scale: float = 100.0, inference_mode: str = "whole", window_size: int = 448,
                 window_stride: int = 224, window_batch_size: int = 4, bg_threshold: float = 0.0,
                 area_threshold: float = 0.0, background_class: str = "background", pamr: Optional[PAMR] = None):
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
            window_batch_size: windows encoded per backbone forward.
            bg_threshold: pixels whose highest class probability is below it go to `background_class`; 0 = off.
            area_threshold: SCLIP's rule, before the background rule: a foreground class whose argmax area is at
                most this fraction of all foreground-argmax pixels gets probability 0 everywhere; 0 = off.
            background_class: display name of the vocabulary's background class (needed when either rule is on).
            pamr: optional PAMR refinement of the logits with the image.
        """
        super().__init__()
        if inference_mode not in ("whole", "slide"):
            raise ValueError(f"MODEL.DENSE_SEG.INFERENCE_MODE={inference_mode!r}; use 'whole' or 'slide'")
        if window_size <= 0 or window_stride <= 0:
            raise ValueError(f"MODEL.DENSE_SEG.WINDOW_SIZE={window_size} and WINDOW_STRIDE={window_stride} must be "
                             "positive")
        if window_stride > window_size:
            raise ValueError(f"MODEL.DENSE_SEG.WINDOW_STRIDE={window_stride} > WINDOW_SIZE={window_size} would "
                             "leave pixels uncovered")
        if window_batch_size < 1:
            raise ValueError(f"MODEL.DENSE_SEG.WINDOW_BATCH_SIZE={window_batch_size} must be >= 1")
        if not 0.0 <= bg_threshold <= 1.0:
            raise ValueError(f"MODEL.DENSE_SEG.BG_THRESHOLD={bg_threshold} must be a probability in [0, 1]")
        if not 0.0 <= area_threshold < 1.0:
            raise ValueError(f"MODEL.DENSE_SEG.AREA_THRESHOLD={area_threshold} must be a fraction in [0, 1)")
        self.backbone = backbone
        self.text_classifier = text_classifier
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.logit_scale = logit_scale
        self.inference_mode = inference_mode
        self.window_size = window_size
        self.window_stride = window_stride
        self.window_batch_size = window_batch_size
        self.bg_threshold = bg_threshold
        self.area_threshold = area_threshold
        self.background_class = background_class
        self.pamr = pamr
        self._vocabulary: Optional[Vocabulary] = None
        self._vocabulary_spec = vocabulary

    @classmethod
    def from_config(cls, cfg):
        visual, text_model = split_clip(load_open_clip_from_cfg(cfg))
        vocabulary = cfg.MODEL.TEXT.VOCABULARY or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
        d = cfg.MODEL.DENSE_SEG
        return {
            "backbone": CLIPViTDenseEncoder(cfg, visual=visual),
            "text_classifier": TextClassifier(cfg, text_model=text_model),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "vocabulary": vocabulary,
            "logit_scale": d.LOGIT_SCALE,
            "inference_mode": d.INFERENCE_MODE,
            "window_size": d.WINDOW_SIZE,
            "window_stride": d.WINDOW_STRIDE,
            "window_batch_size": d.WINDOW_BATCH_SIZE,
            "bg_threshold": d.BG_THRESHOLD,
            "area_threshold": d.AREA_THRESHOLD,
            "background_class": d.BACKGROUND_CLASS,
            "pamr": PAMR(d.PAMR_ITERS, d.PAMR_DILATIONS) if d.PAMR_ITERS > 0 else None,
        }

    @classmethod
    def output_tasks(cls, cfg) -> Tuple[str, ...]:
        """The detectron2 output keys this model produces (picks the evaluators)."""
        return ("sem_seg",)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device


    def low_res_logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images, H and W multiples of the patch size -> (B, C, H/p, W/p) logits."""
        dense = self.backbone(images)["clip_dense"]  # (B, D, H/p, W/p)
        return self.logit_scale * torch.einsum("bdhw,cd->bchw", dense, text.to(dense.dtype)).float()

    def _window_logits(self, padded: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Sliding windows over a padded (3, Hp, Wp) image, averaged at feature resolution: (C, Hp/p, Wp/p).

        Windows lie on the patch grid (offsets are multiples of p, the last row/column flush with the padded
        border, a window larger than the image shrinks to it), so each window's patch logits add onto grid
        cells exactly. One window covering the image gives the whole-image result.
        """
        p = self.backbone.patch_size
        window = max(p, self.window_size // p * p)
        stride = max(p, self.window_stride // p * p)
        hp, wp = padded.shape[-2:]
        logits = padded.new_zeros((text.shape[0], hp // p, wp // p), dtype=torch.float32)
        count = padded.new_zeros((1, hp // p, wp // p), dtype=torch.float32)
        windows = sliding_windows((hp, wp), window, stride)  # all multiples of p, all of one size
        for i in range(0, len(windows), self.window_batch_size):
            batch = windows[i:i + self.window_batch_size]
            crops = torch.stack([padded[:, y0:y1, x0:x1] for y0, x0, y1, x1 in batch])  # (b, 3, wh, ww)
            for (y0, x0, y1, x1), lg in zip(batch, self.low_res_logits(crops, text)):
                logits[:, y0 // p:y1 // p, x0 // p:x1 // p] += lg
                count[:, y0 // p:y1 // p, x0 // p:x1 // p] += 1
        return logits.div_(count)

    def segment(self, image: torch.Tensor, text: torch.Tensor, out_size: Optional[Tuple[int, int]] = None
                ) -> torch.Tensor:
        """(3, H, W) normalised image -> (C, out_h, out_w) class probabilities (default out size: H, W).

        The patch-resolution logits are bilinearly resampled once, from the padded patch grid straight to the
        output pixels (the padding cut off on the way), a chunk of classes at a time, each chunk PAMR-refined
        against the image at the output size; then softmax in place and the background rule.
        """
        h, w = image.shape[-2:]
        out_h, out_w = out_size or (h, w)
        padded = self.backbone.pad(image[None])[0]  # (3, Hp, Wp)
        if self.inference_mode == "whole":
            low = self.low_res_logits(padded[None], text)[0]
        else:
            low = self._window_logits(padded, text)  # (C, Hp/p, Wp/p)
        p = self.backbone.patch_size
        # output pixel i samples image position (i + 0.5) * h / out_h - 0.5, i.e. that position's patch coordinate
        ry = bilinear_matrix(out_h, low.shape[1], h / (out_h * p), device=low.device)  # (out_h, Hp/p)
        rx = bilinear_matrix(out_w, low.shape[2], w / (out_w * p), device=low.device)  # (out_w, Wp/p)
        affinities = None
        if self.pamr is not None:
            rgb = F.interpolate(image[None].float(), size=(out_h, out_w), mode="bilinear", align_corners=False)
            affinities = self.pamr.affinities(rgb)  # (1, K, out_h, out_w)
        out = low.new_empty((low.shape[0], out_h, out_w))
        step = max(1, _CHUNK_ELEMENTS // (out_h * out_w))
        for c in range(0, low.shape[0], step):
            chunk = torch.matmul(ry, low[c:c + step] @ rx.T)  # (c, out_h, out_w)
            out[c:c + step] = chunk if affinities is None else self.pamr.propagate(chunk[None], affinities)[0]
        probs = softmax_(out, 0)
        if self.area_threshold > 0 or self.bg_threshold > 0:
            bg = self._background_index()
        if self.area_threshold > 0:
            area = torch.bincount(probs.argmax(0).flatten(), minlength=len(probs)).float()
            area[bg] = 0
            small = area <= self.area_threshold * area.sum()
            small[bg] = False
            probs[small] = 0.0
        if self.bg_threshold > 0:
            # SCLIP / ClearCLIP / NACLIP: argmax, then background where the top probability is below the threshold
            uncertain = probs.amax(0) < self.bg_threshold  # (out_h, out_w)
            probs.masked_fill_(uncertain[None], 0.0)
            probs[bg].masked_fill_(uncertain, 1.0)
        return probs

    def _background_index(self) -> int:
        names = [n.lower() for n in self.vocabulary.names]
        if self.background_class.lower() not in names:
            raise ValueError(
                f"MODEL.DENSE_SEG.BG_THRESHOLD={self.bg_threshold} / AREA_THRESHOLD={self.area_threshold} need a "
                "class named "
                f"{self.background_class!r} (MODEL.DENSE_SEG.BACKGROUND_CLASS) in the vocabulary: "
                f"{self.vocabulary.names[:8]}{' ...' if len(names) > 8 else ''}; set both to 0 for benchmarks "
                "without a background class"
            )
        return names.index(self.background_class.lower())

    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, torch.Tensor]]:
        if self.training:
            raise RuntimeError("CLIPDenseSegmentor is training-free: use it with --eval-only or the demo")
        text = self.text_classifier(self.vocabulary)  # (C, D)
        if self.bg_threshold > 0 or self.area_threshold > 0:
            self._background_index()  # fail before any image work
        results = []
        for inp in batched_inputs:
            image = inp["image"].to(self.device)
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"expected a 3-channel (3, H, W) image, got shape {tuple(image.shape)}")
            h, w = image.shape[-2:]
            if min(h, w) < 1:
                raise ValueError(f"empty image of shape {tuple(image.shape)}")
            normed = (image.float() - self.pixel_mean) / self.pixel_std
            results.append({"sem_seg": self.segment(normed, text, (inp.get("height", h), inp.get("width", w)))})
        return results
