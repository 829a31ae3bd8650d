from .clipself import CLIPSelfDistiller, save_open_clip_checkpoint
from .dense_segmentor import CLIPDenseSegmentor, sliding_windows
from .mask_segmentor import OpenVocabMaskSegmentor

__all__ = ["CLIPDenseSegmentor", "CLIPSelfDistiller", "OpenVocabMaskSegmentor", "save_open_clip_checkpoint",
           "sliding_windows"]
