from .base import OpenVocabModel, resolve_vocabulary, seen_mask
from .catseg import CATSegSegmentor
from .clipself import CLIPSelfDistiller, save_open_clip_checkpoint
from .dense_segmentor import CLIPDenseSegmentor, sliding_windows
from .groupvit import GroupViTSegmentor
from .lseg import LSegSegmentor
from .mask_segmentor import OpenVocabMaskSegmentor

__all__ = ["CATSegSegmentor", "CLIPDenseSegmentor", "CLIPSelfDistiller", "GroupViTSegmentor", "LSegSegmentor",
           "OpenVocabMaskSegmentor", "OpenVocabModel",
           "resolve_vocabulary", "save_open_clip_checkpoint", "seen_mask", "sliding_windows"]
