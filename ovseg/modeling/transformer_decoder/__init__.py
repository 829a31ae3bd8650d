from .build import TRANSFORMER_DECODER_REGISTRY, build_transformer_decoder
from .masked_attention import MaskedAttentionDecoder

__all__ = ["MaskedAttentionDecoder", "TRANSFORMER_DECODER_REGISTRY", "build_transformer_decoder"]
