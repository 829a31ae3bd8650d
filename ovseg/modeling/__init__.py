from . import backbone, meta_arch, text  # noqa: F401  (registers backbones and meta-architectures)
from .clip_model import WeightsUnavailableError, load_open_clip, split_clip
from .region_pooling import pool_boxes, pool_masks
from .tiny_models import register_tiny_models

register_tiny_models()

__all__ = ["WeightsUnavailableError", "load_open_clip", "pool_boxes", "pool_masks", "split_clip"]
