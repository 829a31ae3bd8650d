"""Region pooling on dense CLIP maps: one helper for boxes and one for masks, shared by every model; and the
crop-and-resize of boxes out of an image batch (a teacher's view of a region)."""
from __future__ import annotations

from typing import List, Union

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align


def pool_boxes(dense: torch.Tensor, boxes: Union[torch.Tensor, List[torch.Tensor]], stride: float,
               output_size: int = 1) -> torch.Tensor:
    """Average dense features inside boxes with RoIAlign.

    Args:
        dense: (B, D, h, w) feature map whose cells are `stride` input pixels apart.
        boxes: per-image (K_i, 4) xyxy boxes in input pixels (a list of B tensors), or a (K, 5) tensor whose
            first column is the batch index.
        stride: input pixels per feature cell (the patch size).
        output_size: RoIAlign output bins per side; the bins are averaged.
    Returns:
        (K, D) region features, K = total boxes, in batch order.
    """
    if isinstance(boxes, (list, tuple)):
        boxes = [b.to(dense.dtype) for b in boxes]
    else:
        boxes = boxes.to(dense.dtype)
    pooled = roi_align(dense, boxes, output_size=output_size, spatial_scale=1.0 / stride, sampling_ratio=-1,
                       aligned=True)  # (K, D, s, s)
    return pooled.mean(dim=(2, 3))


def crop_boxes(images: torch.Tensor, boxes: List[torch.Tensor], size: int) -> torch.Tensor:
    """Cut boxes out of images and resize each to size x size (stretched; bilinear, one sample per output pixel at
    its centre, i.e. RoIAlign with one sample per bin; no anti-aliasing when shrinking).

    Args:
        images: (B, C, H, W); boxes: per image (K_i, 4) xyxy in pixels of `images`.
    Returns:
        (K, C, size, size), K = total boxes, in batch order.
    """
    boxes = [b.to(images.dtype) for b in boxes]
    return roi_align(images, boxes, output_size=size, spatial_scale=1.0, sampling_ratio=1, aligned=True)


def pool_masks(dense: torch.Tensor, masks: torch.Tensor, eps: float = 1e-6, binary: bool = False) -> torch.Tensor:
    """Mask-weighted average of dense features.

    Args:
        dense: (B, D, h, w) features.
        masks: (B, Q, H, W) soft or binary masks at any resolution; resized (bilinear) to (h, w) when needed.
            With `binary`, mask logits instead: resized, then binarised at 0 (FC-CLIP's `MaskPooling`).
        binary: plain mean over the cells where the resized logits are > 0.
    Returns:
        (B, Q, D): sum(mask * feature) / sum(mask) per mask; zeros for empty masks.
    """
    if not binary:
        masks = masks.to(dense.dtype)
    if masks.shape[-2:] != dense.shape[-2:]:
        masks = F.interpolate(masks, size=dense.shape[-2:], mode="bilinear", align_corners=False)
    if binary:  # binarised in the logits' precision, not the features'
        masks = (masks > 0).to(dense.dtype)
    weighted = torch.einsum("bqhw,bdhw->bqd", masks, dense)
    return weighted / masks.sum(dim=(2, 3)).unsqueeze(-1).clamp(min=eps)


def region_scores(feats: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(N, D) pooled region features and (C, D) normalised class embeddings -> (N, C) cosine similarities, in
    float32 also inside a bf16 / fp16 autocast region (they are outputs, read by the evaluator)."""
    with torch.autocast(device_type=feats.device.type, enabled=False):
        return F.normalize(feats.float(), dim=-1) @ text.float().T
