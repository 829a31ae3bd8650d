from .clip_vit import (
                       DENSE_MODE_REGISTRY,
                       DENSE_MODES,
                       CLIPViTDenseEncoder,
                       DenseMode,
                       build_clip_vit_backbone,
                       resize_pos_embed,
)

__all__ = ["DENSE_MODE_REGISTRY", "DENSE_MODES", "CLIPViTDenseEncoder", "DenseMode", "build_clip_vit_backbone",
           "resize_pos_embed"]
