"""Images and label maps as files: reading images for the models (8-bit, 3-channel, whatever the file's bit depth),
labels checked against them, the model's (3, H, W) tensor, and the COCO panoptic PNG colour code."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from PIL import Image

# file names (lower-cased) taken as images wherever a folder is searched for them
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# greyscale modes holding more than 8 bits: detectron2's read_image clips them to 0..255 when converting to RGB
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def read_image(path: str, format: str = "RGB") -> np.ndarray:
    """detectron2's `read_image`, except that 16-bit greyscale is scaled to 8 bits (value / 257) instead of clipped.

    Returns:
        (H, W, 3) uint8 in `format` ("RGB" or "BGR"; other detectron2 formats as detectron2 gives them).
    """
    with Image.open(path) as probe:  # header only
        mode = probe.mode
    if mode not in _WIDE_GREY_MODES:
        return utils.read_image(path, format=format)
    with Image.open(path) as im:
        grey = np.asarray(im).astype(np.int64)
    if grey.size and (grey.min() < 0 or grey.max() > 65535):
        raise ValueError(f"image {path!r}: greyscale values outside 0..65535 (mode {mode}) are not supported")
    grey8 = ((grey * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257): 65535 -> 255, 0 -> 0
    return utils.convert_PIL_to_numpy(Image.fromarray(grey8, mode="L"), format)


def check_label_size(label: np.ndarray, image: np.ndarray, label_path: str, image_path: str) -> None:
    """A label map must cover its image pixel for pixel; say which two files disagree.

    Args:
        label, image: (H, W, ...) arrays.
    """
    check_label_shape(label.shape[:2], image.shape[:2], label_path, image_path)


def check_label_shape(label_hw: Sequence[int], image_hw: Sequence[int], label_path: str, image_path: str) -> None:
    """`check_label_size` on (height, width) pairs, for callers that hold only the sizes (e.g. a prediction)."""
    (lh, lw), (ih, iw) = tuple(label_hw)[:2], tuple(image_hw)[:2]
    if (lh, lw) != (ih, iw):
        raise ValueError(
            f"label map {label_path!r} is {lw}x{lh} (WxH) but its image {image_path!r} is {iw}x{ih}: the dataset's "
            "label maps do not match its images"
        )


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, C) array -> (C, H, W) tensor of the same dtype, contiguous (what detectron2 models take as "image")."""
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))


def id2rgb(id_map: np.ndarray) -> np.ndarray:
    """(H, W) segment ids -> (H, W, 3) uint8 colours of the COCO panoptic PNG format (id = R + 256 G + 256^2 B)."""
    id_map = np.asarray(id_map, dtype=np.int64)
    if id_map.size and (id_map.min() < 0 or id_map.max() >= 256**3):
        raise ValueError(f"segment ids must be in 0..{256**3 - 1} for a COCO panoptic PNG, got "
                         f"{id_map.min()}..{id_map.max()}")
    return np.stack([id_map % 256, id_map // 256 % 256, id_map // 256**2], axis=-1).astype(np.uint8)


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """Inverse of `id2rgb`: (H, W, 3) colours of a COCO panoptic PNG -> (H, W) int64 segment ids."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"a COCO panoptic PNG is (H, W, 3) RGB, got an array of shape {rgb.shape}")
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
