from typing import Dict

from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry
from torch import nn

PIXEL_DECODER_REGISTRY = Registry("OVSEG_PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = """Pixel decoders: backbone features -> (mask features, multi-scale features).

Registered classes are built with `cls(cfg, input_shape)` (detectron2 `@configurable`) and return from
`forward(features)` the mask features (B, MASK_DIM, h, w) and a list of (B, CONV_DIM, h_l, w_l) levels,
coarsest first.
"""


def build_pixel_decoder(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """The pixel decoder named by MODEL.MASK_SEG.PIXEL_DECODER.NAME."""
    name = cfg.MODEL.MASK_SEG.PIXEL_DECODER.NAME
    if name not in PIXEL_DECODER_REGISTRY:
        raise KeyError(f"MODEL.MASK_SEG.PIXEL_DECODER.NAME={name!r} is not registered; "
                       f"known: {sorted(k for k, _ in PIXEL_DECODER_REGISTRY)}")
    return PIXEL_DECODER_REGISTRY.get(name)(cfg, input_shape)
