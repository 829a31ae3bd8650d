from .dense_segmentor import CLIPDenseSegmentor, sliding_windows
from .mask_segmentor import OpenVocabMaskSegmentor

__all__ = ["CLIPDenseSegmentor", "OpenVocabMaskSegmentor", "sliding_windows"]
