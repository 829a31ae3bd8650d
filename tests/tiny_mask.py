"""Tiny OpenVocabMaskSegmentor configs for the tests."""


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
