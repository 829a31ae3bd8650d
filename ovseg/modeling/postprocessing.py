"""Semantic / panoptic / instance inference from per-query class probabilities and masks, shared by every
mask-classification meta-architecture. Inputs are one image's predictions at output resolution: a (Q, H, W)
tensor of mask probabilities, or `OutputMasks`, which resizes only the queries that are asked for.

The rules are FC-CLIP's (`fcclip/fcclip.py`, bytedance/fc-clip@2b0bbe2, the same as Mask2Former's
`maskformer_model.py`), so that PQ / AP / mIoU are computed as in the papers; the implementation differs only
in working a few queries at a time instead of on a (Q, H, W) stack.

Device rule: every output tensor (`sem_seg`, the panoptic label map, every `Instances` field including
`pred_boxes`) is on the device of the masks passed in, which is the model's device; nothing goes through the
CPU. Only the Python numbers of `segments_info` leave the device.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances


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
    """Masks of Q queries at output resolution, computed on indexing for just those queries: `masks[keep]`
    gives probabilities, `masks.logits_at(keep)` the resized logits. Panoptic and instance inference look at
    a few confident queries, and the full (Q, H, W) stack costs more than the rest of the post-processing."""

    def __init__(self, logits: torch.Tensor, padded_size: Sequence[int], image_size: Sequence[int],
                 output_size: Sequence[int]):
        """logits: (Q, h, w) on the mask grid of the padded image; sizes as in `resize_to_output`."""
        self.logits = logits.float()  # post-processing in fp32, also after bf16 / fp16 autocast
        self.sizes = (padded_size, image_size, output_size)
        self.shape = (logits.shape[0], *output_size)
        self.device = logits.device

    def __len__(self) -> int:
        return self.shape[0]

    def logits_at(self, index) -> torch.Tensor:
        """Resized logits of the indexed queries: (k, H, W), or (H, W) for an integer index."""
        selected = self.logits[index]
        single = selected.dim() == 2
        out = resize_to_output(selected[None] if single else selected, *self.sizes)
        return out[0] if single else out

    def __getitem__(self, index) -> torch.Tensor:
        return self.logits_at(index).sigmoid_()


Masks = Union[torch.Tensor, OutputMasks]


def pixel_counts(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N,) int64 counts. Row sums in float32 (bool sums convert slowly), exact below 2^24
    pixels per row, then summed as integers."""
    return masks.float().sum(2).long().sum(1)


def mask_boxes(masks: torch.Tensor) -> Boxes:
    """Tight xyxy boxes of (N, H, W) bool masks, on the masks' device; all-zero boxes for empty masks. The
    same boxes as detectron2's `BitMasks.get_bounding_boxes`, which builds them on the CPU."""
    n, h, w = masks.shape
    cols, rows = masks.any(1), masks.any(2)  # (N, W), (N, H)
    # first / last True by argmax over an int copy (argmax of bool is not implemented everywhere)
    x0, y0 = cols.byte().argmax(1), rows.byte().argmax(1)
    x1, y1 = w - cols.flip(1).byte().argmax(1), h - rows.flip(1).byte().argmax(1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    return Boxes(boxes * cols.any(1, keepdim=True))


_QUERY_CHUNK = 8  # queries per step: a chunk of output masks stays below glibc's 32 MB mmap threshold


def semantic_inference(probs: torch.Tensor, masks: Masks) -> torch.Tensor:
    """Per-pixel class scores: sum over queries of p(class | query) * p(pixel in mask | query).

    Args:
        probs: (Q, K + 1) class probabilities, last column = void (dropped).
        masks: (Q, H, W) mask probabilities (sigmoid), or `OutputMasks` (summed a few queries at a time).
    Returns:
        (K, H, W) scores (the format `SemSegEvaluator` reads: argmax over dim 0).
    """
    if isinstance(masks, torch.Tensor):
        return torch.einsum("qk,qhw->khw", probs[:, :-1], masks)
    out = None
    for start in range(0, len(masks), _QUERY_CHUNK):
        part = torch.einsum("qk,qhw->khw", probs[start:start + _QUERY_CHUNK, :-1],
                            masks[start:start + _QUERY_CHUNK])
        out = part if out is None else out.add_(part)
    return out


def panoptic_inference(probs: torch.Tensor, masks: Masks, is_thing: torch.Tensor,
                       object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8
                       ) -> Tuple[torch.Tensor, List[Dict]]:
    """Non-overlapping segments from the confident queries (FC-CLIP's / Mask2Former's rule).

    Queries whose most likely class is void, or whose best score is at most `object_mask_threshold`, are
    dropped. Each pixel is won by the kept query maximising score * mask probability (ties: the earlier query).
    A query becomes a segment if it wins at least `overlap_threshold` times as many pixels as its own mask
    (>= 0.5) has, counting every pixel it wins, also where its own mask is below 0.5; its segment is the pixels
    it wins where its own mask is >= 0.5, and must not be empty. Segments are numbered from 1 in query order; a
    stuff query whose class already has a segment adds its pixels to that one.

    Args:
        probs: (Q, K + 1) class probabilities (last = void); masks: (Q, H, W) mask probabilities or
            `OutputMasks`.
        is_thing: (K,) bool.
    Returns:
        panoptic_seg (H, W) int32 (0 = unassigned) and segments_info, a list of {"id", "category_id",
        "isthing", "score", "area"} in detectron2's format (score: the best of the merged queries' scores;
        area: the segment's pixels in panoptic_seg).
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
    won = torch.bincount(owner.flatten(), minlength=len(scores)).tolist()
    owner = owner.masked_fill_(~claimed, len(scores))  # won but not claimed: an extra index, never labelled
    areas = torch.bincount(owner.flatten(), minlength=len(scores) + 1).tolist()  # segment pixels, disjoint
    segment_of = [0] * len(scores)  # kept query -> segment id (0 = dropped)
    stuff_segment: Dict[int, int] = {}
    for q in range(len(scores)):
        own_area, area = own_areas[q], areas[q]
        if own_area == 0 or won[q] == 0 or area == 0 or won[q] / own_area < overlap_threshold:
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


def _probs_and_binary(masks: Masks, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and foreground of the indexed queries: logits > 0 for `OutputMasks` (FC-CLIP binarises
    the logits), probabilities > 0.5 for a probability tensor."""
    if isinstance(masks, OutputMasks):
        logits = masks.logits_at(index)
        return logits.sigmoid(), logits > 0
    chunk = masks[index]
    return chunk, chunk > 0.5


def instance_inference(probs: torch.Tensor, masks: Masks, is_thing: torch.Tensor, top_k: int = 100
                       ) -> Instances:
    """Instances from the top-k (query, class) pairs, as FC-CLIP.

    The top-k is taken over every (query, non-void class) pair, and the pairs of non-thing classes are then
    dropped, so fewer than `top_k` may remain. Score = p(class | query) * mean mask probability inside the
    binarised mask (a query may yield several classes). Boxes are the masks' tight boxes (FC-CLIP writes zero
    boxes; its mask AP does not read them).

    Args:
        probs: (Q, K + 1) class probabilities (last = void); masks: (Q, H, W) mask probabilities or
            `OutputMasks`.
        is_thing: (K,) bool; only thing classes are returned.
    Returns:
        Instances with pred_masks (N, H, W) bool, pred_boxes, scores (N,), pred_classes (N,), N <= top_k, in
        decreasing order of class probability.
    """
    num_classes = probs.shape[1] - 1
    h, w = masks.shape[-2:]
    flat = probs[:, :-1].flatten()
    scores, idx = flat.topk(min(top_k, len(flat)))
    query, classes = idx // num_classes, idx % num_classes
    thing = is_thing.to(classes.device)[classes]
    scores, query, classes = scores[thing], query[thing], classes[thing]
    # each picked query's mask once (a query often yields several classes), a few queries at a time
    queries, which = query.unique(return_inverse=True)
    binary = torch.empty((len(queries), h, w), dtype=torch.bool, device=probs.device)
    mask_score = probs.new_empty(len(queries))
    for start in range(0, len(queries), _QUERY_CHUNK):
        chunk, own = _probs_and_binary(masks, queries[start:start + _QUERY_CHUNK])  # (k, H, W)
        binary[start:start + len(chunk)] = own
        # mean probability inside the binary mask, FC-CLIP's 1e-6 keeping empty masks at 0; float sums
        # vectorise, bool ones convert slowly
        mask_score[start:start + len(chunk)] = chunk.mul_(own).sum((1, 2)) / (pixel_counts(own) + 1e-6)
    result = Instances((h, w))
    result.pred_masks = binary[which]
    result.pred_boxes = mask_boxes(binary)[which]
    result.scores = scores * mask_score[which]
    result.pred_classes = classes
    return result
