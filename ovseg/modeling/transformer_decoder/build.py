from detectron2.utils.registry import Registry
from torch import nn

TRANSFORMER_DECODER_REGISTRY = Registry("OVSEG_TRANSFORMER_DECODER")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """Query decoders: (multi-scale features, mask features) -> per-query masks and
class embeddings. Built with `cls(cfg, in_channels=..., mask_dim=..., embed_dim=...)` (detectron2 `@configurable`)."""


def build_transformer_decoder(cfg, in_channels: int, mask_dim: int, embed_dim: int) -> nn.Module:
    """The decoder named by MODEL.MASK_SEG.DECODER.NAME; `embed_dim` is the CLIP text-embedding size."""
    name = cfg.MODEL.MASK_SEG.DECODER.NAME
    if name not in TRANSFORMER_DECODER_REGISTRY:
        raise KeyError(f"MODEL.MASK_SEG.DECODER.NAME={name!r} is not registered; "
                       f"known: {sorted(k for k, _ in TRANSFORMER_DECODER_REGISTRY)}")
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels=in_channels, mask_dim=mask_dim,
                                                   embed_dim=embed_dim)
