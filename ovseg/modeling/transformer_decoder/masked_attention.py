"""Masked-attention transformer decoder (Mask2Former's design): learned queries attend to one pyramid level per
layer, restricted to the foreground of the mask the previous layer predicted; every layer predicts masks and
CLIP-space class embeddings (deep supervision)."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from ..position_encoding import sine_position_encoding
from .build import TRANSFORMER_DECODER_REGISTRY


class _SubLayer(nn.Module):
    """Residual wrapper: x + dropout(f(norm(x))) (pre-norm) or norm(x + dropout(f(x))) (post-norm)."""

    def __init__(self, dim: int, pre_norm: bool, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.pre_norm = pre_norm
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, fn) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(fn(self.norm(x)))
        return self.norm(x + self.dropout(fn(x)))


class DecoderLayer(nn.Module):
    """Masked cross-attention to image features, then self-attention among queries, then an FFN."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, dim))
        self.sub = nn.ModuleList(_SubLayer(dim, pre_norm, dropout) for _ in range(3))

    def forward(self, q: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor,
                attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            q, query_pos: (B, Q, C) query content and positional embedding.
            memory, memory_pos: (B, L, C) flattened features of one level and their encoding.
            attn_mask: (B * heads, Q, L) bool, True = query may not look at that location; or None.
        """
        q = self.sub[0](q, lambda x: self.cross_attn(x + query_pos, memory + memory_pos, memory,
                                                     attn_mask=attn_mask, need_weights=False)[0])
        q = self.sub[1](q, lambda x: self.self_attn(x + query_pos, x + query_pos, x, need_weights=False)[0])
        return self.sub[2](q, self.ffn)


class MLP(nn.Sequential):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int):
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        mods: List[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods.append(nn.ReLU(inplace=True))
        super().__init__(*mods)


@TRANSFORMER_DECODER_REGISTRY.register()
class MaskedAttentionDecoder(nn.Module):
    """N learned queries -> per-layer (mask logits, class embeddings in CLIP text space)."""

    @configurable
    def __init__(self, *, in_channels: int, mask_dim: int, embed_dim: int, hidden_dim: int = 256,
                 num_queries: int = 100, heads: int = 8, ffn_dim: int = 2048, layers: int = 9,
                 num_levels: int = 3, dropout: float = 0.0, pre_norm: bool = False):
        """
        Args:
            in_channels: channels of the pixel decoder's multi-scale levels.
            mask_dim: channels of the mask features.
            embed_dim: size of the CLIP text embeddings the class embeddings are compared with.
            hidden_dim, num_queries, heads, ffn_dim, layers, dropout, pre_norm: decoder shape.
            num_levels: levels attended, round robin from the coarsest.
        """
        super().__init__()
        if layers < 1 or num_queries < 1 or num_levels < 1:
            raise ValueError(f"MODEL.MASK_SEG.DECODER: LAYERS={layers}, NUM_QUERIES={num_queries} and "
                             f"NUM_LEVELS={num_levels} must be positive")
        if hidden_dim % 4:
            raise ValueError(f"MODEL.MASK_SEG.DECODER.HIDDEN_DIM={hidden_dim} must be divisible by 4")
        self.num_levels = num_levels
        self.num_queries = num_queries
        self.heads = heads
        self.input_proj = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_dim, kernel_size=1) if in_channels != hidden_dim else nn.Identity()
            for _ in range(num_levels)
        )
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_pos = nn.Embedding(num_queries, hidden_dim)
        self.layers = nn.ModuleList(DecoderLayer(hidden_dim, heads, ffn_dim, dropout, pre_norm) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, embed_dim)  # into CLIP text space
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels: int, mask_dim: int, embed_dim: int):
        d = cfg.MODEL.MASK_SEG.DECODER
        return {
            "in_channels": in_channels, "mask_dim": mask_dim, "embed_dim": embed_dim,
            "hidden_dim": d.HIDDEN_DIM, "num_queries": d.NUM_QUERIES, "heads": d.HEADS, "ffn_dim": d.FFN_DIM,
            "layers": d.LAYERS, "num_levels": d.NUM_LEVELS, "dropout": d.DROPOUT, "pre_norm": d.PRE_NORM,
        }

    def predict(self, q: torch.Tensor, mask_features: torch.Tensor, next_size: Optional[Tuple[int, int]]
                ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Heads on the current queries.

        Returns:
            class embeddings (B, Q, D); mask logits (B, Q, h, w) on the mask-feature grid; and the attention
            mask for the next layer (B * heads, Q, h_l * w_l), True where the predicted mask is background,
            or None when there is no next layer.
        """
        q = self.norm(q)
        embeds = self.class_embed(q)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(q), mask_features)
        if next_size is None:
            return embeds, masks, None
        with torch.no_grad():
            small = F.interpolate(masks.detach(), size=next_size, mode="bilinear", align_corners=False)
            blocked = small.sigmoid().flatten(2) < 0.5  # (B, Q, h_l * w_l)
            # a query whose mask is empty would attend to nothing (NaN): let it see the whole level instead
            blocked[blocked.all(dim=-1)] = False
            blocked = blocked.repeat_interleave(self.heads, dim=0)  # (B * heads, Q, L)
        return embeds, masks, blocked

    def forward(self, multi_scale: List[torch.Tensor], mask_features: torch.Tensor) -> Dict[str, object]:
        """
        Args:
            multi_scale: pixel-decoder levels (B, C, h_l, w_l), coarsest first (at least `num_levels`).
            mask_features: (B, mask_dim, h, w).
        Returns:
            {"pred_embeds": (B, Q, D), "pred_masks": (B, Q, h, w) logits, "aux_outputs": the same for the
            input to the first layer and every layer but the last, in order}.
        """
        if len(multi_scale) < self.num_levels:
            raise ValueError(f"the decoder attends to {self.num_levels} levels but the pixel decoder gives "
                             f"{len(multi_scale)}; lower MODEL.MASK_SEG.DECODER.NUM_LEVELS")
        b = mask_features.shape[0]
        memories, poses, sizes = [], [], []
        for i in range(self.num_levels):
            x = self.input_proj[i](multi_scale[i])  # (B, C, h_l, w_l)
            h, w = x.shape[-2:]
            sizes.append((h, w))
            memories.append(x.flatten(2).transpose(1, 2))  # (B, h_l*w_l, C)
            pos = sine_position_encoding(h, w, x.shape[1], x.device, x.dtype).flatten(1).t()
            poses.append((pos + self.level_embed.weight[i].to(x.dtype))[None])
        q = self.query_feat.weight[None].expand(b, -1, -1)  # (B, Q, C)
        qpos = self.query_pos.weight[None].expand(b, -1, -1)
        predictions = []
        embeds, masks, attn_mask = self.predict(q, mask_features, sizes[0])
        predictions.append((embeds, masks))
        for i, layer in enumerate(self.layers):
            lvl = i % self.num_levels
            q = layer(q, qpos, memories[lvl], poses[lvl], attn_mask)
            last = i == len(self.layers) - 1
            embeds, masks, attn_mask = self.predict(q, mask_features,
                                                    None if last else sizes[(i + 1) % self.num_levels])
            predictions.append((embeds, masks))
        return {
            "pred_embeds": predictions[-1][0],
            "pred_masks": predictions[-1][1],
            "aux_outputs": [{"pred_embeds": e, "pred_masks": m} for e, m in predictions[:-1]],
        }
