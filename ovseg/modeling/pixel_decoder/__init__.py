from .build import PIXEL_DECODER_REGISTRY, build_pixel_decoder
from .vit_pyramid import ViTPyramidPixelDecoder

__all__ = ["PIXEL_DECODER_REGISTRY", "ViTPyramidPixelDecoder", "build_pixel_decoder"]
