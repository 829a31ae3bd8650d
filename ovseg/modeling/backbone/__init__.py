from .clip_vit import DENSE_MODES, CLIPViTDenseEncoder, resize_pos_embed

__all__ = ["DENSE_MODES", "CLIPViTDenseEncoder", "resize_pos_embed"]
