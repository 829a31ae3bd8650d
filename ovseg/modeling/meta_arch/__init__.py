from .clipself import CLIPSelfDistiller, save_open_clip_checkpoint
from .dense_segmentor import CLIPDenseSegmentor, sliding_windows

__all__ = ["CLIPDenseSegmentor", "CLIPSelfDistiller", "save_open_clip_checkpoint", "sliding_windows"]
