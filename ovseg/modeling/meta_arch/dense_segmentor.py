"""Training-free open-vocabulary semantic segmentation straight from CLIP's dense features."""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

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


def apply_background_threshold(probs: torch.Tensor, background: int, threshold: float) -> torch.Tensor:
    """In place on (C, H, W) probabilities: where the best foreground class has probability < `threshold`,
    the pixel becomes background (probability 1), as SCLIP / ClearCLIP / NACLIP do on benchmarks with a
    background class. Their rule (argmax, then max prob < thd -> background) gives the same labels."""
    keep = probs[background].clone()
    probs[background] = 0
    low = probs.amax(0) < threshold  # (H, W): best foreground probability
    probs[background] = keep
    probs.masked_fill_(low[None], 0.0)
    probs[background].masked_fill_(low, 1.0)
    return probs


@META_ARCH_REGISTRY.register()
class CLIPDenseSegmentor(nn.Module):
    """Per-pixel logits = scale * <clip_dense, class text embedding>, upsampled to the output size.

    No trainable parameters: any CLIP / CLIPSelf checkpoint runs as is, in any `MODEL.CLIP.DENSE_MODE`
    (SCLIP / ClearCLIP / NACLIP presets: configs/trainingfree/). Output per image: ``{"sem_seg": (C, height,
    width)}`` class probabilities, the format `SemSegEvaluator` reads.

    Inference: patch-level logits (whole image, or sliding windows averaged on the patch grid) are upsampled
    once, straight to the output size, in chunks of classes (each optionally refined by PAMR); the only
    full-resolution (C, H, W) tensor is the output, made into probabilities in place.
    """

    @configurable
    def __init__(self, *, backbone: CLIPViTDenseEncoder, text_classifier: TextClassifier,
                 pixel_mean: Tuple[float, ...], pixel_std: Tuple[float, ...], vocabulary=None,
                 logit_scale: float = 100.0, inference_mode: str = "whole", window_size: int = 448,
                 window_stride: int = 224, window_batch_size: int = 4, bg_threshold: float = 0.0,
                 bg_class: str = "background", pamr_iterations: int = 0, pamr_dilations: Sequence[int] = (8, 16)):
        """
        Args:
            backbone: the CLIP dense encoder.
            text_classifier: the frozen text tower (same CLIP model).
            pixel_mean, pixel_std: per-channel normalisation of the 0-255 RGB input.
            vocabulary: initial vocabulary (anything `parse_vocabulary` accepts); `set_vocabulary` changes it.
            logit_scale: multiplier of the cosine similarities before the softmax.
            inference_mode: "whole" or "slide".
            window_size, window_stride: sliding-window geometry in input pixels (multiples of the patch size).
            window_batch_size: windows encoded per backbone forward.
            bg_threshold: pixels whose best foreground probability is below it become `bg_class`; 0 = off.
            bg_class: name of the vocabulary's background class (needed when bg_threshold > 0).
            pamr_iterations, pamr_dilations: PAMR refinement of the logits; 0 iterations = off.
        """
        super().__init__()
        if inference_mode not in ("whole", "slide"):
            raise ValueError(f"MODEL.DENSE_SEG.INFERENCE_MODE={inference_mode!r}; use 'whole' or 'slide'")
        p = backbone.patch_size
        if window_size <= 0 or window_stride <= 0 or window_size % p or window_stride % p:
            raise ValueError(f"MODEL.DENSE_SEG.WINDOW_SIZE={window_size} and WINDOW_STRIDE={window_stride} must be "
                             f"positive multiples of the patch size {p} (windows are placed on the patch grid)")
        if window_stride > window_size:
            raise ValueError(f"MODEL.DENSE_SEG.WINDOW_STRIDE={window_stride} > WINDOW_SIZE={window_size} would "
                             "leave pixels uncovered")
        if window_batch_size < 1:
            raise ValueError(f"MODEL.DENSE_SEG.WINDOW_BATCH_SIZE={window_batch_size} must be >= 1")
        if not 0.0 <= bg_threshold <= 1.0:
            raise ValueError(f"MODEL.DENSE_SEG.BG_THRESHOLD={bg_threshold} must be a probability in [0, 1]")
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
        self.bg_class = bg_class
        self.pamr = PAMR(pamr_iterations, pamr_dilations) if pamr_iterations > 0 else None
        self._vocabulary: Optional[Vocabulary] = None
        self._vocabulary_spec = vocabulary

    @classmethod
    def from_config(cls, cfg):
        visual, text_model = split_clip(load_open_clip(cfg.MODEL.CLIP.MODEL_NAME, cfg.MODEL.CLIP.PRETRAINED))
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
            "bg_class": d.BG_CLASS,
            "pamr_iterations": d.PAMR_ITERATIONS,
            "pamr_dilations": list(d.PAMR_DILATIONS),
        }

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

    def background_index(self) -> int:
        names = [n.lower() for n in self.vocabulary.names]
        if self.bg_class.lower() not in names:
            raise ValueError(f"MODEL.DENSE_SEG.BG_THRESHOLD={self.bg_threshold} needs a class named "
                             f"{self.bg_class!r} (MODEL.DENSE_SEG.BG_CLASS) in the vocabulary; it has "
                             f"{self.vocabulary.names[:8]}{' ...' if len(names) > 8 else ''}. Set BG_THRESHOLD 0 "
                             "for benchmarks without a background class")
        return names.index(self.bg_class.lower())

    def patch_logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(3, H, W) normalised image -> (C, ceil(H/p), ceil(W/p)) cosine similarities on the patch grid of the
        image zero-padded (bottom/right) to a multiple of the patch size p.

        "slide": windows lie on the patch grid (offsets are multiples of p, the last row/column flush with the
        padded border, a window larger than the image shrinks to it), so each window's patch logits add onto
        grid cells exactly; overlaps are averaged. One window covering the image is the whole-image result.
        """
        x = self.backbone.pad(image[None])[0]  # (3, Hp, Wp)
        if self.inference_mode == "whole":
            dense = self.backbone(x[None])["clip_dense"][0]  # (D, Hp/p, Wp/p)
            return torch.einsum("dhw,cd->chw", dense, text.to(dense.dtype)).float()
        p = self.backbone.patch_size
        hp, wp = x.shape[-2:]
        acc = x.new_zeros((text.shape[0], hp // p, wp // p), dtype=torch.float32)
        count = x.new_zeros((1, hp // p, wp // p), dtype=torch.float32)
        windows = sliding_windows((hp, wp), self.window_size, self.window_stride)
        for i in range(0, len(windows), self.window_batch_size):
            batch = windows[i:i + self.window_batch_size]
            crops = torch.stack([x[:, y0:y1, x0:x1] for y0, x0, y1, x1 in batch])  # (b, 3, wh, ww), equal sizes
            dense = self.backbone(crops)["clip_dense"]  # (b, D, wh/p, ww/p)
            logits = torch.einsum("bdhw,cd->bchw", dense, text.to(dense.dtype)).float()
            for (y0, x0, y1, x1), lg in zip(batch, logits):
                acc[:, y0 // p:y1 // p, x0 // p:x1 // p] += lg
                count[:, y0 // p:y1 // p, x0 // p:x1 // p] += 1
        return acc.div_(count)

    def segment(self, image: torch.Tensor, text: torch.Tensor,
                out_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """(3, H, W) normalised image -> (C, out_h, out_w) class probabilities (default out size: H, W).

        The patch logits are bilinearly resampled once, from the patch grid straight to the output pixels (the
        padding cut off on the way), then optionally PAMR-refined against the image at the output size, scaled,
        softmaxed in place and background-thresholded.
        """
        h, w = image.shape[-2:]
        out_h, out_w = out_size or (h, w)
        low = self.patch_logits(image, text)  # (C, gh, gw)
        p = self.backbone.patch_size
        # output pixel i reads image position (i + 0.5) * h / out_h - 0.5, i.e. that position's patch coordinate
        ry = bilinear_matrix(out_h, low.shape[1], h / (out_h * p), device=low.device)  # (out_h, gh)
        rx = bilinear_matrix(out_w, low.shape[2], w / (out_w * p), device=low.device)  # (out_w, gw)
        affinity = None
        if self.pamr is not None:
            guide = F.interpolate(image[None].float(), size=(out_h, out_w), mode="bilinear", align_corners=False)
            affinity = self.pamr.affinity(guide[0])  # (P, out_h, out_w)
        out = low.new_empty((low.shape[0], out_h, out_w))
        step = max(1, _CHUNK_ELEMENTS // (out_h * out_w))
        for c in range(0, low.shape[0], step):
            chunk = torch.matmul(ry, low[c:c + step] @ rx.T)  # (c, out_h, out_w)
            out[c:c + step] = chunk if affinity is None else self.pamr.propagate(chunk, affinity)
        probs = softmax_(out.mul_(self.logit_scale), 0)
        if self.bg_threshold > 0:
            apply_background_threshold(probs, self.background_index(), self.bg_threshold)
        return probs

    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, torch.Tensor]]:
        if self.training:
            raise RuntimeError("CLIPDenseSegmentor is training-free: use it with --eval-only or the demo")
        text = self.text_classifier(self.vocabulary)  # (C, D)
        if self.bg_threshold > 0:
            self.background_index()  # fail before any image work
        results = []
        for inp in batched_inputs:
            image = inp["image"].to(self.device)
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"expected a 3-channel (3, H, W) image, got shape {tuple(image.shape)}")
            h, w = image.shape[-2:]
            if min(h, w) < 1:
                raise ValueError(f"empty image of shape {tuple(image.shape)}")
            out_size = (inp.get("height", h), inp.get("width", w))
            probs = self.segment((image.float() - self.pixel_mean) / self.pixel_std, text, out_size)
            results.append({"sem_seg": probs})
        return results
