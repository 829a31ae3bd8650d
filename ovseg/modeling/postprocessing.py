"""Semantic / panoptic / instance inference from per-query class probabilities and masks, shared by every
mask-classification meta-architecture. Inputs are one image's predictions at output resolution: a (Q, H, W)
tensor, or `OutputMasks`, which resizes only the queries that are asked for."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks, Instances


def resize_to_output(maps: torch.Tensor, padded_size: Sequence[int], image_size: Sequence[int],
                     output_size: Sequence[int]) -> torch.Tensor:
    """(N, h, w) maps covering a padded batch image -> (N, *output_size), as detectron2's `sem_seg_postprocess`:
    bilinear to the padded input size, crop the image, bilinear to the output size (skipped when equal, where
    it is the identity). Channels-last, so that the resize is vectorised over the N maps."""
    x = maps[None].contiguous(memory_format=torch.channels_last)
    x = F.interpolate(x, size=tuple(padded_size), mode="bilinear", align_corners=False)
    x = x[..., : image_size[0], : image_size[1]]
    if tuple(image_size) != tuple(output_size):
        x = F.interpolate(x, size=tuple(output_size), mode="bilinear", align_corners=False)
    return x[0]


class OutputMasks:
    """Mask probabilities of Q queries at output resolution, computed on indexing (`masks[keep]`) for just
    those queries: panoptic and instance inference look at a few confident ones, and the full (Q, H, W)
    stack costs more than the rest of the post-processing."""

    def __init__(self, logits: torch.Tensor, padded_size: Sequence[int], image_size: Sequence[int],
                 output_size: Sequence[int]):
        """logits: (Q, h, w) on the mask grid of the padded image; sizes as in `resize_to_output`."""
        self.logits = logits.float()  # post-processing in fp32, also after bf16 / fp16 autocast
        self.sizes = (padded_size, image_size, output_size)
        self.shape = (logits.shape[0], *output_size)
        self.device = logits.device

    def __getitem__(self, index) -> torch.Tensor:
        selected = self.logits[index]
        single = selected.dim() == 2
        out = resize_to_output(selected[None] if single else selected, *self.sizes).sigmoid_()
        return out[0] if single else out


def pixel_counts(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N,) int64 counts. Row sums in float32 (bool sums convert slowly), exact below 2^24
    pixels per row, then summed as integers."""
    return masks.float().sum(2).long().sum(1)


def semantic_inference(probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-pixel class scores: sum over queries of p(class | query) * p(pixel in mask | query).

    Args:
        probs: (Q, K + 1) class probabilities, last column = void (dropped).
        masks: (Q, H, W) mask probabilities (sigmoid).
    Returns:
        (K, H, W) scores (the format `SemSegEvaluator` reads: argmax over dim 0).
    """
    return torch.einsum("qk,qhw->khw", probs[:, :-1], masks)


_QUERY_CHUNK = 8  # queries per step: a chunk of output masks stays below glibc's 32 MB mmap threshold


def panoptic_inference(probs: torch.Tensor, masks: torch.Tensor, is_thing: torch.Tensor,
                       object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8
                       ) -> Tuple[torch.Tensor, List[Dict]]:
    """Non-overlapping segments from the confident queries.

    Queries whose best non-void class scores at most `object_mask_threshold` are dropped. Each pixel goes to
    the kept query maximising score * mask probability; a query keeps its pixels only where its own mask is
    >= 0.5, and only if those are at least `overlap_threshold` of its own mask. Stuff queries of the same class
    are merged into one segment.

    Args:
        probs: (Q, K + 1) class probabilities (last = void); masks: (Q, H, W) mask probabilities.
        is_thing: (K,) bool.
    Returns:
        panoptic_seg (H, W) int32 (0 = unassigned, segments numbered from 1) and segments_info, a list of
        {"id", "category_id", "isthing", "score", "area"} in detectron2's format.
    """
    segments: List[Dict] = []
    scores, labels = probs[:, :-1].max(-1)  # best non-void class per query
    keep = (scores > object_mask_threshold) & (probs.argmax(-1) != probs.shape[-1] - 1)
    if not keep.any():
        return torch.zeros(masks.shape[-2:], dtype=torch.int32, device=masks.device), segments
    scores, labels, kept = scores[keep], labels[keep], keep.nonzero()[:, 0]
    # A few queries at a time, so that no (K, H, W) stack is ever held: the owner of a pixel is the running
    # argmax of score * mask (ties to the earlier query, as argmax), and it claims the pixel if its own mask does.
    own_areas, best, owner, claimed = [], None, None, None
    for start in range(0, len(kept), _QUERY_CHUNK):
        chunk = masks[kept[start:start + _QUERY_CHUNK]]  # (k, H, W); indexing copies: ours to change
        own = chunk >= 0.5
        own_areas += pixel_counts(own).tolist()
        value, index = chunk.mul_(scores[start:start + len(chunk), None, None]).max(0)
        mine = own.gather(0, index[None])[0]
        if best is None:
            best, owner, claimed = value, index, mine
        else:
            better = value > best
            best = torch.where(better, value, best)
            owner = torch.where(better, index + start, owner)
            claimed = torch.where(better, mine, claimed)
    owner = owner.masked_fill_(~claimed, len(scores))  # unclaimed pixels: an extra index
    areas = torch.bincount(owner.flatten(), minlength=len(scores) + 1).tolist()  # regions are disjoint
    segment_of = [0] * len(scores)  # kept query -> segment id (0 = dropped)
    stuff_segment: Dict[int, int] = {}
    for q in range(len(scores)):
        own_area, area = own_areas[q], areas[q]
        if own_area == 0 or area == 0 or area / own_area < overlap_threshold:
            continue
        cls = int(labels[q])
        thing = bool(is_thing[cls])
        if not thing and cls in stuff_segment:
            segment_of[q] = stuff_segment[cls]
            seg = segments[segment_of[q] - 1]
            seg["area"] += area
            seg["score"] = max(seg["score"], float(scores[q]))
            continue
        segment_of[q] = len(segments) + 1
        segments.append({"id": segment_of[q], "category_id": cls, "isthing": thing, "score": float(scores[q]),
                         "area": area})
        if not thing:
            stuff_segment[cls] = segment_of[q]
    return torch.tensor(segment_of + [0], dtype=torch.int32, device=masks.device)[owner], segments


def instance_inference(probs: torch.Tensor, masks: torch.Tensor, is_thing: torch.Tensor, top_k: int = 100
                       ) -> Instances:
    """Top-k (query, thing class) pairs as detectron2 Instances.

    Score = p(class | query) * mean mask probability inside the binarised mask (a query may yield several
    classes). Boxes are the masks' bounding boxes.

    Args:
        probs: (Q, K + 1) class probabilities (last = void); masks: (Q, H, W) mask probabilities.
        is_thing: (K,) bool; only thing classes are returned.
    Returns:
        Instances with pred_masks (N, H, W) bool, pred_boxes, scores (N,), pred_classes (N,).
    """
    q, k1 = probs.shape
    h, w = masks.shape[-2:]
    cls_scores = probs[:, :-1] * is_thing.to(probs.dtype)[None]  # non-things can never be picked
    flat = cls_scores.flatten()
    top_k = min(top_k, int((flat > 0).sum()))
    scores, idx = flat.topk(top_k)
    query, classes = idx // (k1 - 1), idx % (k1 - 1)
    # each picked query's mask once (a query often yields several classes), a few queries at a time
    queries, which = query.unique(return_inverse=True)
    binary = torch.empty((len(queries), h, w), dtype=torch.bool, device=probs.device)
    mask_score = probs.new_empty(len(queries))
    for start in range(0, len(queries), _QUERY_CHUNK):
        chunk = masks[queries[start:start + _QUERY_CHUNK]]  # (k, H, W); indexing copies: ours to change
        own = binary[start:start + len(chunk)]
        torch.ge(chunk, 0.5, out=own)
        # mean probability inside the binary mask; float sums vectorise, bool ones convert slowly
        mask_score[start:start + len(chunk)] = (chunk.mul_(own).sum((1, 2)) /
                                                pixel_counts(own).clamp(min=1))
    result = Instances((h, w))
    result.pred_masks = binary[which]
    result.pred_boxes = BitMasks(binary).get_bounding_boxes()[which]
    result.scores = scores * mask_score[which]
    result.pred_classes = classes
    return result
