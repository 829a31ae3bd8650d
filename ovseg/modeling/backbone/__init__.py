from .clip_vit import DENSE_MODE_REGISTRY, DENSE_MODES, CLIPViTDenseEncoder, DenseMode, resize_pos_embed

__all__ = ["DENSE_MODE_REGISTRY", "DENSE_MODES", "CLIPViTDenseEncoder", "DenseMode", "resize_pos_embed"]
