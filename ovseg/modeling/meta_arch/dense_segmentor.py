"""Training-free open-vocabulary semantic segmentation straight from CLIP's dense features."""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from ..backbone.clip_vit import CLIPViTDenseEncoder
from ..pamr import PAMR
from ..text import TextClassifier, max_over_synonyms
from .base import OpenVocabModel

logger = logging.getLogger(__name__)

# Classes resized (and PAMR-refined) together: bounds the temporaries beside the one (C, H, W) output tensor
# to about this many elements (64 MB in float32), whatever the vocabulary size.
_CHUNK_ELEMENTS = 1 << 24


# How window logits are combined (MODEL.DENSE_SEG.WINDOW_MERGE), how a window whose side is not a multiple of the
# patch size is encoded (UNALIGNED_WINDOWS), and how a class's synonyms are scored (SYNONYMS).
WINDOW_MERGES = ("image", "patch")
UNALIGNED_WINDOWS = ("truncate", "pad")
SYNONYM_RULES = ("max", "mean")


def sliding_windows(size: Tuple[int, int], window: int, stride: int) -> List[Tuple[int, int, int, int]]:
    """(y0, x0, y1, x1) windows covering an (H, W) image: offsets at multiples of `stride`, plus one flush with
    the far border where they do not reach it (mmseg's slide inference). A window larger than the image shrinks to
    the image."""
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


def centre_padding(size: Tuple[int, int], multiple: int) -> Tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding that brings an (H, W) window to multiples of `multiple`, split
    evenly with the odd pixel at the right/bottom (ClearCLIP's rule for windows not aligned to the patches)."""
    ph, pw = (-size[0]) % multiple, (-size[1]) % multiple
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


class QueryGroups(NamedTuple):
    """Which class each of S text queries scores: `owner` (S,) int64 on the CPU, and `starts` (C + 1 Python ints):
    class c owns queries starts[c]:starts[c + 1]. Made once per vocabulary, on the host, outside any traced graph."""

    owner: torch.Tensor
    starts: List[int]

    @classmethod
    def of(cls, owner: Optional[torch.Tensor], num_queries: int) -> "QueryGroups":
        """From (S,) class indices, non-decreasing, every class 0..C-1 present; None = one query per class."""
        # one host read of `owner` (none without synonyms); the checks run on Python numbers
        classes = list(range(num_queries)) if owner is None else owner.detach().reshape(-1).tolist()
        if (len(classes) != num_queries or not classes or classes[0] != 0
                or any(b - a not in (0, 1) for a, b in zip(classes, classes[1:]))):
            raise ValueError("owner must give each of the S queries its class, classes 0..C-1 in order, each with "
                             "at least one query")
        starts = [q for q in range(num_queries) if q == 0 or classes[q] != classes[q - 1]] + [num_queries]
        return cls(torch.tensor(classes, dtype=torch.long), starts)


@META_ARCH_REGISTRY.register()
class CLIPDenseSegmentor(OpenVocabModel):
    """Per-pixel class probabilities from scale * <clip_dense, text embedding of each query>.

    No trainable parameters: any CLIP / CLIPSelf checkpoint runs as is, in any `MODEL.CLIP.DENSE_MODE`
    (SCLIP / ClearCLIP / NACLIP presets: configs/trainingfree/). Output per image: ``{"sem_seg": (C, height,
    width)}`` class probabilities, the format `SemSegEvaluator` reads.

    Inference, by default the pipeline of the SCLIP / ClearCLIP / NACLIP code: every synonym of a class is a query
    of its own; the image (whole, or windows placed on its pixel grid) is encoded, each window's patch logits are
    bilinearly upsampled to the window's pixels and averaged where windows overlap, the average is resized to the
    output size (and PAMR-refined if asked); softmax over all queries, maximum over each class's synonyms, then
    SCLIP's area rule and the background rule. Everything after the encoder runs a chunk of classes at a time, so
    the only full-resolution (C, H, W) tensor is the output.
    """

    @configurable
    def __init__(self, *, backbone: CLIPViTDenseEncoder, text_classifier: TextClassifier,
                 pixel_mean: Tuple[float, ...], pixel_std: Tuple[float, ...], vocabulary=None,
                 vocabulary_dataset: Optional[str] = None, logit_scale: float = 100.0,
                 inference_mode: str = "whole", window_size: int = 448,
                 window_stride: int = 224, window_batch_size: int = 4, window_merge: str = "image",
                 unaligned_windows: str = "truncate", synonyms: str = "max", bg_threshold: float = 0.0,
                 area_threshold: float = 0.0, background_class: str = "background", pamr: Optional[PAMR] = None,
                 sem_seg_output: str = "scores"):
        """
        Args:
            backbone: the CLIP dense encoder.
            text_classifier: the frozen text tower (same CLIP model).
            pixel_mean, pixel_std: per-channel normalisation of the 0-255 RGB input.
            vocabulary: initial vocabulary (anything `parse_vocabulary` accepts); `set_vocabulary` changes it.
            vocabulary_dataset: the dataset `vocabulary` is given for (see `OpenVocabModel`).
            logit_scale: multiplier of the cosine similarities before the softmax.
            inference_mode: "whole" or "slide".
            window_size, window_stride: sliding-window geometry in input pixels.
            window_batch_size: windows encoded per backbone forward.
            window_merge: "image" (the authors': windows on the pixel grid, each window's logits upsampled to its
                pixels, averaged in image space, resized once more to the output) or "patch" (ovseg's former rule:
                image padded to the patch size, window size/stride rounded down to it, windows averaged on the
                patch grid, one resampling to the output).
            unaligned_windows: ("image" merge) a window whose side is not a multiple of the patch size is
                "truncate"d (SCLIP / NACLIP: the patch convolution drops the remainder, the smaller logit grid is
                stretched over the window) or zero-"pad"ded evenly on both sides (ClearCLIP; logits cropped back).
            synonyms: "max" (each synonym its own query; softmax over all queries, then the maximum over a class's
                synonyms, as the authors) or "mean" (one query per class, its synonyms' embeddings averaged).
            bg_threshold: pixels whose highest class probability is below it go to `background_class`; 0 = off.
            area_threshold: SCLIP's rule, before the background rule: a foreground class whose argmax area is at
                most this fraction of all foreground-argmax pixels gets probability 0 everywhere; 0 = off.
            background_class: display name of the vocabulary's background class (needed when either rule is on).
            pamr: optional PAMR refinement of the logits with the image.
            sem_seg_output: "scores" ((C, H, W) probabilities) or "labels" ((H, W) int64, their argmax).
        """
        super().__init__(backbone=backbone, text_classifier=text_classifier, pixel_mean=pixel_mean,
                         pixel_std=pixel_std, vocabulary=vocabulary, vocabulary_dataset=vocabulary_dataset,
                         sem_seg_output=sem_seg_output)
        choices = {"INFERENCE_MODE": (inference_mode, ("whole", "slide")),
                   "WINDOW_MERGE": (window_merge, WINDOW_MERGES),
                   "UNALIGNED_WINDOWS": (unaligned_windows, UNALIGNED_WINDOWS),
                   "SYNONYMS": (synonyms, SYNONYM_RULES)}
        for key, (value, valid) in choices.items():
            if value not in valid:
                raise ValueError(f"MODEL.DENSE_SEG.{key}={value!r}; use one of {list(valid)}")
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
        self.logit_scale = logit_scale
        self.inference_mode = inference_mode
        self.window_size = window_size
        self.window_stride = window_stride
        self.window_batch_size = window_batch_size
        self.window_merge = window_merge
        self.unaligned_windows = unaligned_windows
        self.synonyms = synonyms
        self.bg_threshold = bg_threshold
        self.area_threshold = area_threshold
        self.background_class = background_class
        self.pamr = pamr

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DENSE_SEG
        return {
            **cls.clip_parts(cfg),
            **cls.vocabulary_args(cfg),
            **cls.sem_seg_args(cfg),
            "logit_scale": d.LOGIT_SCALE,
            "inference_mode": d.INFERENCE_MODE,
            "window_size": d.WINDOW_SIZE,
            "window_stride": d.WINDOW_STRIDE,
            "window_batch_size": d.WINDOW_BATCH_SIZE,
            "window_merge": d.WINDOW_MERGE,
            "unaligned_windows": d.UNALIGNED_WINDOWS,
            "synonyms": d.SYNONYMS,
            "bg_threshold": d.BG_THRESHOLD,
            "area_threshold": d.AREA_THRESHOLD,
            "background_class": d.BACKGROUND_CLASS,
            "pamr": PAMR(d.PAMR_ITERS, d.PAMR_DILATIONS) if d.PAMR_ITERS > 0 else None,
        }

    def low_res_logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images, H and W multiples of the patch size, (S, D) query embeddings ->
        (B, S, H/p, W/p) logits."""
        dense = self.backbone(images)["clip_dense"]  # (B, D, H/p, W/p)
        return self.logit_scale * torch.einsum("bdhw,cd->bchw", dense, text.to(dense.dtype)).float()

    def _windows(self, size: Tuple[int, int], multiple: int = 1) -> List[Tuple[int, int, int, int]]:
        """The windows of an image of `size`, size and stride rounded down to `multiple` (at least one)."""
        if self.inference_mode == "whole":
            return [(0, 0, size[0], size[1])]
        window = max(multiple, self.window_size // multiple * multiple)
        stride = max(multiple, self.window_stride // multiple * multiple)
        return sliding_windows(size, window, stride)

    def _image_space_logits(self, image: torch.Tensor, text: torch.Tensor, out_size: Tuple[int, int]
                            ) -> Tuple[Callable[[int, int], torch.Tensor], int]:
        """The authors' combination of windows ("image" merge) for a (3, h, w) image and (S, D) queries.

        Encodes every window once; returns `logits(q0, q1)`, which gives queries q0:q1 as (q1 - q0, out_h,
        out_w): each window's patch logits bilinearly upsampled to the window's pixels (or to its padded size,
        then cropped), summed in image space, divided by the per-pixel window count, resized to `out_size`;
        and the number of elements per query its temporaries take (to size the chunks).
        """
        p = self.backbone.patch_size
        h, w = image.shape[-2:]
        windows = self._windows((h, w))
        placed = []  # (window, size its logits are upsampled to, (top, left) of the window in that size, logits)
        for i in range(0, len(windows), self.window_batch_size):
            batch = windows[i:i + self.window_batch_size]
            crops, geometry = [], []
            for y0, x0, y1, x1 in batch:
                crop = image[:, y0:y1, x0:x1]
                if self.unaligned_windows == "pad":
                    left, right, top, bottom = centre_padding((y1 - y0, x1 - x0), p)
                    crop = F.pad(crop, (left, right, top, bottom))
                    geometry.append((tuple(crop.shape[-2:]), (top, left)))
                else:
                    gh, gw = (y1 - y0) // p, (x1 - x0) // p
                    if gh == 0 or gw == 0:
                        raise ValueError(f"a {y1 - y0}x{x1 - x0} window is smaller than one {p}x{p} patch; "
                                         "use a larger INPUT.MIN_SIZE_TEST or UNALIGNED_WINDOWS='pad'")
                    # what the stride-p patch convolution reads; a negative pad crops into a new tensor, where a
                    # slice view would make torch.export guard on the image size (its strides' contiguity check)
                    crop = F.pad(crop, (0, gw * p - (x1 - x0), 0, gh * p - (y1 - y0)))
                    geometry.append(((y1 - y0, x1 - x0), (0, 0)))
                crops.append(crop)
            # windows of one image share one size (sliding_windows), so they stack
            for win, geo, lg in zip(batch, geometry, self.low_res_logits(torch.stack(crops), text)):
                placed.append((win, *geo, lg))  # lg: (S, gh, gw)
        count = image.new_zeros((1, h, w), dtype=torch.float32)
        for y0, x0, y1, x1 in windows:
            count[:, y0:y1, x0:x1] += 1

        def logits(q0: int, q1: int) -> torch.Tensor:
            acc = count.new_zeros((q1 - q0, h, w))
            for (y0, x0, y1, x1), up_size, (top, left), lg in placed:
                up = F.interpolate(lg[None, q0:q1], size=up_size, mode="bilinear", align_corners=False)[0]
                acc[:, y0:y1, x0:x1] += up[:, top:top + y1 - y0, left:left + x1 - x0]
            acc.div_(count)
            if (h, w) == tuple(out_size):
                return acc
            return F.interpolate(acc[None], size=out_size, mode="bilinear", align_corners=False)[0]

        largest_window = max(s[0] * s[1] for _, s, _, _ in placed)
        # accumulator, one upsampled window, the resized chunk and the softmax's temporary of its size
        return logits, h * w + largest_window + 2 * out_size[0] * out_size[1]

    def _window_logits(self, padded: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """("patch" merge) windows over a padded (3, Hp, Wp) image, averaged at feature resolution: (S, Hp/p, Wp/p).

        Windows lie on the patch grid (size and stride rounded down to multiples of p, the last row/column flush
        with the padded border), so each window's patch logits add onto grid cells exactly.
        """
        p = self.backbone.patch_size
        hp, wp = padded.shape[-2:]
        low = padded.new_zeros((text.shape[0], hp // p, wp // p), dtype=torch.float32)
        count = padded.new_zeros((1, hp // p, wp // p), dtype=torch.float32)
        windows = self._windows((hp, wp), p)  # all multiples of p, all of one size
        for i in range(0, len(windows), self.window_batch_size):
            batch = windows[i:i + self.window_batch_size]
            crops = torch.stack([padded[:, y0:y1, x0:x1] for y0, x0, y1, x1 in batch])  # (b, 3, wh, ww)
            for (y0, x0, y1, x1), lg in zip(batch, self.low_res_logits(crops, text)):
                low[:, y0 // p:y1 // p, x0 // p:x1 // p] += lg
                count[:, y0 // p:y1 // p, x0 // p:x1 // p] += 1
        return low.div_(count)

    def _patch_grid_logits(self, image: torch.Tensor, text: torch.Tensor, out_size: Tuple[int, int]
                           ) -> Tuple[Callable[[int, int], torch.Tensor], int]:
        """ovseg's former combination ("patch" merge): the image padded to the patch size, windows on the patch
        grid averaged there, then one bilinear resampling from the padded grid straight to the output pixels (the
        padding cut off on the way). Same contract as `_image_space_logits`."""
        p = self.backbone.patch_size
        h, w = image.shape[-2:]
        low = self._window_logits(self.backbone.pad(image[None])[0], text)  # (S, Hp/p, Wp/p)
        out_h, out_w = out_size
        # output pixel i samples image position (i + 0.5) * h / out_h - 0.5, i.e. that position's patch coordinate
        ry = bilinear_matrix(out_h, low.shape[1], h / (out_h * p), device=low.device)  # (out_h, Hp/p)
        rx = bilinear_matrix(out_w, low.shape[2], w / (out_w * p), device=low.device)  # (out_w, Wp/p)

        def logits(q0: int, q1: int) -> torch.Tensor:
            return torch.matmul(ry, low[q0:q1] @ rx.T)  # (q, out_h, out_w)

        return logits, 3 * out_h * out_w  # the (q, out_w) product, the chunk and the softmax's temporary

    def segment(self, image: torch.Tensor, text: torch.Tensor, out_size: Optional[Tuple[int, int]] = None,
                owner: Union[None, torch.Tensor, QueryGroups] = None,
                chunk_elements: Optional[int] = -1, labels: bool = False) -> torch.Tensor:
        """(3, H, W) normalised image -> (C, out_h, out_w) class probabilities (default out size: H, W), or with
        `labels` their (out_h, out_w) int64 argmax, computed a chunk of classes at a time (no (C, out_h, out_w)).

        Args:
            image: the normalised image.
            text: (S, D) normalised query embeddings.
            out_size: output (height, width).
            owner: (S,) class index of each query, non-decreasing, every class 0..C-1 present (as
                `TextClassifier.synonym_embeddings` returns it), or those as `QueryGroups` (made once per
                vocabulary: no host read per image); None = one query per class.
            chunk_elements: bound on the temporaries of one chunk of classes; -1 = the module's `_CHUNK_ELEMENTS`
                (read at call time); None = all classes in one chunk (export: the chunks would otherwise depend on
                the image size).
            labels: return the argmax over classes only.
        Returns:
            (C, out_h, out_w): per class, the highest softmax probability (softmax over all S queries) among its
            queries, after the area and background rules; with `labels`, (out_h, out_w) its argmax.
        """
        out_h, out_w = out_size or tuple(image.shape[-2:])
        if chunk_elements == -1:
            chunk_elements = _CHUNK_ELEMENTS
        groups = owner if isinstance(owner, QueryGroups) else QueryGroups.of(owner, text.shape[0])
        owner, starts = groups
        num_classes = len(starts) - 1
        build = self._image_space_logits if self.window_merge == "image" else self._patch_grid_logits
        logits_of, per_query = build(image, text, (out_h, out_w))
        affinities = None
        if self.pamr is not None:
            rgb = F.interpolate(image[None].float(), size=(out_h, out_w), mode="bilinear", align_corners=False)
            affinities = self.pamr.affinities(rgb)  # (1, K, out_h, out_w)
        chunks = []  # (c0, c1): classes resized (and refined) together
        c0 = 0
        while c0 < num_classes:
            c1 = c0 + 1
            while c1 < num_classes and (chunk_elements is None
                                        or (starts[c1 + 1] - starts[c0]) * per_query <= chunk_elements):
                c1 += 1
            chunks.append((c0, c1))
            c0 = c1

        def class_logits(c0: int, c1: int) -> Tuple[torch.Tensor, torch.Tensor]:
            """Classes c0:c1's best query logits (c1 - c0, out_h, out_w) and the log-sum-exp of all their queries'
            logits (out_h, out_w)."""
            q0, q1 = starts[c0], starts[c1]
            chunk = logits_of(q0, q1)  # (q, out_h, out_w)
            if affinities is not None:
                chunk = self.pamr.propagate(chunk[None], affinities)[0]
            # softmax is monotone in the logit under one denominator: max of probabilities = exp(max logit - lse)
            return max_over_synonyms(chunk, owner[q0:q1] - c0, c1 - c0, dim=0), torch.logsumexp(chunk, 0)

        if labels:
            return self._segment_labels(chunks, class_logits, num_classes)
        out = image.new_empty((num_classes, out_h, out_w), dtype=torch.float32)
        lse = None  # (out_h, out_w) log of the softmax denominator over all queries, accumulated chunk by chunk
        for c0, c1 in chunks:
            out[c0:c1], part = class_logits(c0, c1)
            lse = part if lse is None else torch.logaddexp(lse, part)
        probs = out.sub_(lse).exp_()
        if self.area_threshold > 0 or self.bg_threshold > 0:
            bg = self._background_index()
        if self.area_threshold > 0:
            area = torch.bincount(probs.argmax(0).flatten(), minlength=len(probs)).float()
            area[bg] = 0
            small = area <= self.area_threshold * area.sum()
            small[bg] = False
            probs.masked_fill_(small[:, None, None], 0.0)  # boolean indexing would read the count back (nonzero)
        if self.bg_threshold > 0:
            # SCLIP / ClearCLIP / NACLIP: argmax, then background where the top probability is below the threshold
            uncertain = probs.amax(0) < self.bg_threshold  # (out_h, out_w)
            probs.masked_fill_(uncertain[None], 0.0)
            probs[bg].masked_fill_(uncertain, 1.0)
        return probs

    def _segment_labels(self, chunks: List[Tuple[int, int]], class_logits, num_classes: int) -> torch.Tensor:
        """`segment(labels=True)`: the running argmax of the class logits over the chunks (same argmax as the
        probabilities', which share one denominator). SCLIP's area rule needs the argmax before it drops classes:
        then a second pass recomputes the chunks with the dropped classes at -inf."""

        def argmax_pass(dropped: Optional[torch.Tensor]):
            best = label = lse = None
            for c0, c1 in chunks:
                logits, part = class_logits(c0, c1)
                if dropped is not None:
                    logits = logits.masked_fill(dropped[c0:c1, None, None], float("-inf"))
                value, index = logits.max(0)
                if best is None:
                    best, label, lse = value, index, part
                else:
                    better = value > best  # ties keep the earlier class, as argmax
                    best = torch.where(better, value, best)
                    label = torch.where(better, index + c0, label)
                    lse = torch.logaddexp(lse, part)
            return best, label, lse

        best, label, lse = argmax_pass(None)
        if self.area_threshold > 0 or self.bg_threshold > 0:
            bg = self._background_index()
        if self.area_threshold > 0:
            area = torch.zeros(num_classes, device=label.device).index_add_(
                0, label.flatten(), torch.ones(label.numel(), device=label.device))
            area[bg] = 0
            small = area <= self.area_threshold * area.sum()
            small[bg] = False
            best, label, _ = argmax_pass(small)
        if self.bg_threshold > 0:
            label = label.masked_fill((best - lse).exp() < self.bg_threshold, bg)
        return label

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

    def queries(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(S, D) query embeddings of the vocabulary and the (S,) class of each (None: one query per class)."""
        return self.text_queries(self.vocabulary, self.synonyms)

    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, torch.Tensor]]:
        if self.training:
            raise RuntimeError("CLIPDenseSegmentor is training-free: use it with --eval-only or the demo")
        text, owner = self.queries()
        groups = QueryGroups.of(owner, text.shape[0])  # the one host read of `owner`, per batch
        if self.bg_threshold > 0 or self.area_threshold > 0:
            self._background_index()  # fail before any image work
        results = []
        for inp in batched_inputs:
            image = inp["image"]
            self.check_image(image)
            h, w = image.shape[-2:]
            normed = self.normalize(image)
            out_size = (inp.get("height", h), inp.get("width", w))
            results.append({"sem_seg": self.segment(normed, text, out_size, groups,
                                                        labels=self.sem_seg_output == "labels")})
        return results
