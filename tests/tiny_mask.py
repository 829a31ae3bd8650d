"""Tiny OpenVocabMaskSegmentor configs and a panopticapi stand-in for the tests."""
import sys
import types

import numpy as np

from tests.helpers import tiny_cfg


def tiny_mask_cfg(**overrides):
    """OpenVocabMaskSegmentor on the tiny random ViT: hidden dim 32, 8 queries, 2 decoder layers."""
    cfg = tiny_cfg()
    cfg.MODEL.META_ARCHITECTURE = "OpenVocabMaskSegmentor"
    pd, dec = cfg.MODEL.MASK_SEG.PIXEL_DECODER, cfg.MODEL.MASK_SEG.DECODER
    pd.IN_FEATURES = ["res2", "res2", "res3", "res3"]  # the tiny tower exports 2 levels
    pd.CONV_DIM, pd.MASK_DIM, pd.TRANSFORMER_LAYERS, pd.TRANSFORMER_HEADS, pd.TRANSFORMER_FFN_DIM = 32, 32, 1, 4, 64
    dec.HIDDEN_DIM, dec.NUM_QUERIES, dec.HEADS, dec.FFN_DIM, dec.LAYERS = 32, 8, 4, 64, 2
    cfg.MODEL.MASK_SEG.LOSS.NUM_POINTS = 256
    opts = []
    for k, v in overrides.items():
        opts += [k.replace("__", "."), v]
    cfg.merge_from_list(opts)
    return cfg


def install_panopticapi_shim():
    """detectron2's COCOPanopticEvaluator imports panopticapi (not installed here); hotcoco's pq_compute has
    its signature and results. Stand-in until ovseg.evaluation's backend choice lands."""
    if "panopticapi" in sys.modules:
        return
    try:
        import panopticapi.evaluation  # noqa: F401
        return
    except ImportError:
        pass
    from hotcoco.panoptic import pq_compute

    def id2rgb(ids):
        ids = np.asarray(ids).astype(np.int64)
        return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)

    pkg = types.ModuleType("panopticapi")
    ev = types.ModuleType("panopticapi.evaluation")
    ev.pq_compute = pq_compute
    ut = types.ModuleType("panopticapi.utils")
    ut.id2rgb = id2rgb
    pkg.evaluation, pkg.utils = ev, ut
    sys.modules.update({"panopticapi": pkg, "panopticapi.evaluation": ev, "panopticapi.utils": ut})
