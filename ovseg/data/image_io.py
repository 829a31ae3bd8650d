"""Reading images for the models: 8-bit, 3-channel, whatever the file's bit depth; labels checked against them."""
from __future__ import annotations

import numpy as np
from detectron2.data import detection_utils as utils
from PIL import Image

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
    """A label map must cover its image pixel for pixel; say which two files disagree."""
    if label.shape[:2] != image.shape[:2]:
        raise ValueError(
            f"label map {label_path!r} is {label.shape[1]}x{label.shape[0]} (WxH) but its image {image_path!r} is "
            f"{image.shape[1]}x{image.shape[0]}: the dataset's label maps do not match its images"
        )
