from . import backbone, meta_arch, pixel_decoder, text, transformer_decoder  # noqa: F401  (registries)
from .clip_model import WeightsUnavailableError, load_open_clip, split_clip
from .region_pooling import pool_boxes, pool_masks

__all__ = ["WeightsUnavailableError", "load_open_clip", "pool_boxes", "pool_masks", "split_clip"]
