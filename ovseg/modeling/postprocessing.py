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

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances

from ..utils.shapes import is_symbolic


def resize_to_output(maps: torch.Tensor, padded_size: Sequence[int], image_size: Sequence[int],
                     output_size: Sequence[int]) -> torch.Tensor:
    """(N, h, w) maps covering a padded batch image -> (N, *output_size), as detectron2's `sem_seg_postprocess`:
    bilinear to the padded input size, crop the image, bilinear to the output size (skipped when equal, where
    it is the identity). Channels-last, so that the resize is vectorised over the N maps."""
    x = maps[None].contiguous(memory_format=torch.channels_last)
    x = F.interpolate(x, size=tuple(padded_size), mode="bilinear", align_corners=False)
    if is_symbolic(image_size):  # torch.export: a slice view would make it guard on the image size; a crop by a
        x = F.pad(x, (0, image_size[1] - x.shape[-1], 0, image_size[0] - x.shape[-2]))  # negative pad copies
    else:
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


def _fp32(device: torch.device):
    """Post-processing in float32 also inside a bf16 / fp16 autocast region: the scores are outputs."""
    return torch.autocast(device_type=device.type, enabled=False)


def semantic_inference(probs: torch.Tensor, masks: Masks) -> torch.Tensor:
    """Per-pixel class scores: sum over queries of p(class | query) * p(pixel in mask | query).

    Args:
        probs: (Q, K + 1) class probabilities, last column = void (dropped).
        masks: (Q, H, W) mask probabilities (sigmoid), or `OutputMasks` (summed a few queries at a time).
    Returns:
        (K, H, W) float32 scores (the format `SemSegEvaluator` reads: argmax over dim 0), also under autocast.
    """
    with _fp32(probs.device):
        probs = probs[:, :-1].float()
        if isinstance(masks, torch.Tensor):
            return torch.einsum("qk,qhw->khw", probs, masks.float())
        h, w = masks.shape[-2:]
        out = probs.new_zeros((probs.shape[1], h * w))
        for start in range(0, len(masks), _QUERY_CHUNK):
            # accumulated in place: no second (K, H, W) tensor for each chunk's part
            out.addmm_(probs[start:start + _QUERY_CHUNK].T, masks[start:start + _QUERY_CHUNK].flatten(1))
        return out.view(-1, h, w)


def _axis_matrix(in_size: int, padded: int, image: int, output: int, device) -> torch.Tensor:
    """(output, in_size) matrix of `resize_to_output` along one axis (bilinear is separable): the resize applied
    to the unit vectors, the other axis kept at size 1 (where bilinear is the identity)."""
    eye = torch.eye(in_size, device=device)[:, :, None]  # (in, in, 1): unit vector i along the axis
    return resize_to_output(eye, (padded, 1), (image, 1), (output, 1))[:, :, 0].T


BAND_ELEMENTS = 1 << 24  # floats in one band of `semantic_labels` (64 MB in float32)


def semantic_labels(probs: torch.Tensor, masks: Masks, max_elements: Optional[int] = None,
                    sizes: Optional[Tuple[Sequence[int], Sequence[int], Sequence[int]]] = None) -> torch.Tensor:
    """(H, W) int64 class of each pixel: the argmax over classes of `semantic_inference`'s scores, computed a
    band of rows at a time, so that neither a (K, H, W) score tensor nor a (Q, H, W) mask stack is ever held
    (847 classes at 2000x1500 would be 10 GB of scores). For `OutputMasks` the resize is written as one matrix
    per axis, the same weights as `resize_to_output` (equal scores up to float rounding).

    Args:
        probs: (Q, K + 1) class probabilities, last = void (dropped).
        masks: (Q, H, W) mask probabilities or `OutputMasks`.
        max_elements: bound on the floats of one band's temporaries ((Q + K) x rows x W); default `BAND_ELEMENTS`.
        sizes: (padded, image, output) sizes: the labels of `resize_to_output(semantic_inference(probs, masks),
            *sizes)` instead (the scores combined on the masks' grid, then resized), band by band as well.
    """
    max_elements = max_elements or BAND_ELEMENTS
    if sizes is not None:
        return _resized_labels(semantic_inference(probs, masks), *sizes, max_elements=max_elements)
    q, k = probs.shape[0], probs.shape[1] - 1
    h, w = masks.shape[-2:]
    device = masks.device
    with _fp32(device):
        probs = probs[:, :-1].float()
        rows = max(1, max_elements // ((q + k) * w))
        if isinstance(masks, OutputMasks):
            (ph, pw), (ih, iw), _ = masks.sizes
            ry = _axis_matrix(masks.logits.shape[1], ph, ih, h, device)  # (H, h)
            rx = _axis_matrix(masks.logits.shape[2], pw, iw, w, device)  # (W, w)
            right = torch.einsum("qhv,xv->qhx", masks.logits, rx)  # (Q, h, W): the width resize, once
        labels = torch.empty((h, w), dtype=torch.long, device=device)
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            if isinstance(masks, OutputMasks):
                band = torch.einsum("yh,qhx->qyx", ry[r0:r1], right).sigmoid_()  # (Q, rows, W)
            else:
                band = masks[:, r0:r1].float()
            labels[r0:r1] = torch.einsum("qk,qyx->kyx", probs, band).argmax(0)
    return labels


def _resized_labels(scores: torch.Tensor, padded_size: Sequence[int], image_size: Sequence[int],
                    output_size: Sequence[int], max_elements: int) -> torch.Tensor:
    """(H, W) int64 argmax over classes of `resize_to_output(scores, ...)` for (K, h, w) scores, a band of output
    rows at a time."""
    k, gh, gw = scores.shape
    h, w = output_size
    with _fp32(scores.device):
        ry = _axis_matrix(gh, padded_size[0], image_size[0], h, scores.device)  # (H, h)
        rx = _axis_matrix(gw, padded_size[1], image_size[1], w, scores.device)  # (W, w)
        scores = scores.float()
        rows = max(1, max_elements // (k * (w + gw)))
        labels = torch.empty((h, w), dtype=torch.long, device=scores.device)
        for r0 in range(0, h, rows):
            band = torch.einsum("yh,khv->kyv", ry[r0:r0 + rows], scores)  # (K, rows, w): rows first, then columns
            labels[r0:r0 + rows] = torch.einsum("kyv,xv->kyx", band, rx).argmax(0)
    return labels


def _count(index: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) int64 occurrences of each value of `index` (values < n). Unlike `torch.bincount`, which reads the
    largest value back to the host on CUDA, this never syncs."""
    flat = index.flatten()
    return torch.zeros(n, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))


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

    Everything stays on the masks' device, without per-query Python work; two host reads: the kept queries
    (only their masks are resized), and the segment table at the end.

    Args:
        probs: (Q, K + 1) class probabilities (last = void); masks: (Q, H, W) mask probabilities or
            `OutputMasks`.
        is_thing: (K,) bool.
    Returns:
        panoptic_seg (H, W) int32 (0 = unassigned) and segments_info, a list of {"id", "category_id",
        "isthing", "score", "area"} in detectron2's format (score: the best of the merged queries' scores;
        area: the segment's pixels in panoptic_seg).
    """
    device = masks.device
    with _fp32(device):
        probs = probs.float()
        scores, labels = probs[:, :-1].max(-1)  # best non-void class per query
        keep = (scores > object_mask_threshold) & (probs.argmax(-1) != probs.shape[-1] - 1)
        # host read 1 of 2: which queries are kept (their masks are resized, the others never are)
        kept = keep.nonzero()[:, 0]
        scores, labels = scores[kept], labels[kept]
        num_kept = len(kept)
        if num_kept == 0:
            return torch.zeros(masks.shape[-2:], dtype=torch.int32, device=device), []
        # A few queries at a time, so that no (K, H, W) stack is ever held: the owner of a pixel is the running
        # argmax of score * mask (ties to the earlier query, as argmax), and it claims the pixel if its own mask
        # does.
        own_areas, best, owner, claimed = [], None, None, None
        for start in range(0, num_kept, _QUERY_CHUNK):
            chunk = masks[kept[start:start + _QUERY_CHUNK]]  # (k, H, W); indexing copies: ours to change
            own = chunk >= 0.5
            own_areas.append(pixel_counts(own))
            value, index = chunk.mul_(scores[start:start + len(chunk), None, None]).max(0)
            mine = own.gather(0, index[None])[0]
            if best is None:
                best, owner, claimed = value, index, mine
            else:
                better = value > best
                best = torch.where(better, value, best)
                owner = torch.where(better, index + start, owner)
                claimed = torch.where(better, mine, claimed)
        own_area = torch.cat(own_areas)  # (k,)
        won = _count(owner, num_kept)
        owner = owner.masked_fill_(~claimed, num_kept)  # won but not claimed: an extra index, never labelled
        area = _count(owner, num_kept + 1)[:num_kept]  # segment pixels, disjoint
        # the ratio in float64, as FC-CLIP's Python division
        valid = (own_area > 0) & (won > 0) & (area > 0) & \
            (won.double() / own_area.clamp(min=1).double() >= overlap_threshold)
        thing = is_thing.to(device)[labels]
        stuff = valid & ~thing
        # a valid stuff query joins the first valid stuff query of its class (itself if it is the first)
        first_of_class = ((labels[:, None] == labels[None]) & stuff[None]).byte().argmax(1)  # (k,)
        queries = torch.arange(num_kept, device=device)
        head = torch.where(thing, queries, first_of_class)  # the query whose segment q's pixels go to
        new = valid & (head == queries)
        number = torch.cumsum(new, 0)  # segment id of each new segment's query
        segment_of = torch.where(valid, number[head], 0)  # (k,) 0 = dropped
        seg_area = _count_weighted(segment_of, area, num_kept + 1)
        seg_score = scores.new_full((num_kept + 1,), -1.0).scatter_reduce_(0, segment_of, scores, "amax")
        table = torch.stack([new.double(), number.double(), labels.double(), thing.double(),
                             seg_score[number].double(), seg_area[number].double()], 1)  # (k, 6)
        panoptic = torch.cat([segment_of, segment_of.new_zeros(1)]).int()[owner]
    segments = [{"id": int(n), "category_id": int(c), "isthing": bool(t), "score": sc, "area": int(a)}
                for is_new, n, c, t, sc, a in table.tolist() if is_new]  # host read 2 of 2
    return panoptic, segments


def _count_weighted(index: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) sums of `weights` grouped by `index` (values < n), on the device without syncing."""
    return torch.zeros(n, dtype=weights.dtype, device=weights.device).index_add_(0, index, weights)


def _probs_and_binary(masks: Masks, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and foreground of the indexed queries: logits > 0 for `OutputMasks` (FC-CLIP binarises
    the logits), probabilities > 0.5 for a probability tensor."""
    if isinstance(masks, OutputMasks):
        logits = masks.logits_at(index)
        return logits.sigmoid(), logits > 0
    chunk = masks[index].float()
    return chunk, chunk > 0.5


def instance_inference(probs: torch.Tensor, masks: Masks, is_thing: torch.Tensor, top_k: int = 100
                       ) -> Instances:
    """Instances from the top-k (query, class) pairs, as FC-CLIP.

    The top-k is taken over every (query, non-void class) pair, and the pairs of non-thing classes are then
    dropped, so fewer than `top_k` may remain. Score = p(class | query) * mean mask probability inside the
    binarised mask (a query may yield several classes). Boxes are the masks' tight boxes (FC-CLIP writes zero
    boxes; its mask AP does not read them). One host read: which of the top-k pairs are things, and their
    queries (the number of instances is data-dependent).

    Args:
        probs: (Q, K + 1) class probabilities (last = void); masks: (Q, H, W) mask probabilities or
            `OutputMasks`.
        is_thing: (K,) bool; only thing classes are returned.
    Returns:
        Instances with pred_masks (N, H, W) bool, pred_boxes, scores (N,) float32, pred_classes (N,), N <= top_k,
        in decreasing order of class probability.
    """
    device = probs.device
    with _fp32(device):
        probs = probs.float()
        num_classes = probs.shape[1] - 1
        h, w = masks.shape[-2:]
        flat = probs[:, :-1].flatten()
        scores, idx = flat.topk(min(top_k, len(flat)))
        query, classes = idx // num_classes, idx % num_classes
        thing = is_thing.to(device)[classes]
        pair_query, pair_thing = torch.stack([query, thing.long()]).tolist()  # the one host read
        picked = [i for i, t in enumerate(pair_thing) if t]
        # each picked query's mask once (a query often yields several classes), in increasing query order
        queries = sorted({pair_query[i] for i in picked})
        slot = {q: j for j, q in enumerate(queries)}
        picked_t = torch.tensor(picked, dtype=torch.long, device=device)
        which = torch.tensor([slot[pair_query[i]] for i in picked], dtype=torch.long, device=device)
        queries = torch.tensor(queries, dtype=torch.long, device=device)
        binary = torch.empty((len(queries), h, w), dtype=torch.bool, device=device)
        mask_score = probs.new_empty(len(queries))
        for start in range(0, len(queries), _QUERY_CHUNK):
            chunk, own = _probs_and_binary(masks, queries[start:start + _QUERY_CHUNK])  # (k, H, W)
            binary[start:start + len(chunk)] = own
            # mean probability inside the binary mask, FC-CLIP's 1e-6 keeping empty masks at 0; float32 sums of
            # the float mask, as FC-CLIP (exact counts below 2^24 pixels), one cast per chunk
            inside = own.float()
            mask_score[start:start + len(chunk)] = chunk.mul_(inside).sum((1, 2)) / (inside.sum((1, 2)) + 1e-6)
        result = Instances((h, w))
        result.pred_masks = binary[which]
        result.pred_boxes = mask_boxes(binary)[which]
        result.scores = scores[picked_t] * mask_score[which]
        result.pred_classes = classes[picked_t]
    return result
