from .dense_segmentor import CLIPDenseSegmentor, sliding_windows

__all__ = ["CLIPDenseSegmentor", "sliding_windows"]
