from .clip_vit import DENSE_MODES, CLIPViTDenseEncoder, build_clip_vit_backbone, resize_pos_embed

__all__ = ["DENSE_MODES", "CLIPViTDenseEncoder", "build_clip_vit_backbone", "resize_pos_embed"]
