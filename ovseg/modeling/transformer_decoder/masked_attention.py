"""Masked-attention transformer decoder (Mask2Former's design): learned queries attend to one pyramid level per
layer, restricted to the foreground of the mask the previous layer predicted; every layer predicts masks and
CLIP-space class embeddings (deep supervision), by default with FC-CLIP's class head (decoder output plus the
mask features pooled in the query's own mask, through a 3-layer MLP)."""
from __future__ import annotations

from typing import Dict, List, Optional

import fvcore.nn.weight_init as weight_init  # detectron2's own dependency
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from ..low_precision import cast_cached
from ..position_encoding import sine_position_encoding
from ..region_pooling import pool_masks
from .build import TRANSFORMER_DECODER_REGISTRY

CLASS_HEADS = ("fcclip", "linear")


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


def _cast_in_proj(mha: nn.MultiheadAttention, dtype: torch.dtype):
    """`mha`'s packed in-projection weight and bias in `dtype`. Without autograd (inference) the cast copies are
    kept on the module and reused while the parameters are unchanged (`cast_cached`), so an image's forward casts
    none of them again; with autograd they are cast anew (the cast is in the graph)."""
    weight, bias = mha.in_proj_weight, mha.in_proj_bias
    if torch.is_grad_enabled():
        return weight.to(dtype), bias.to(dtype)
    return cast_cached(mha, "in_proj_weight", weight, dtype), cast_cached(mha, "in_proj_bias", bias, dtype)


def attend(mha: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`mha`'s attention (its own weights, batch first) through `F.scaled_dot_product_attention`, so that
    a mask of shape (B, 1, Q, L) serves every head: nn.MultiheadAttention wants it copied per head.

    Args:
        query (B, Q, C), key / value (B, L, C); allowed: bool, True where a query may look, or None.
    """
    b, n, c = query.shape
    heads = mha.num_heads
    weight, bias = mha.in_proj_weight, mha.in_proj_bias
    if torch.is_autocast_enabled(query.device.type):
        # one cast of the packed projection: autocast would cast each chunk (a view, not cached) on its own
        dtype = torch.get_autocast_dtype(query.device.type)
        weight, bias = _cast_in_proj(mha, dtype)
        # the inputs once each (self-attention's query and key are one tensor), not once per projection
        shared = key is query
        query, value = query.to(dtype), value.to(dtype)
        key = query if shared else key.to(dtype)
    w_q, w_k, w_v = weight.chunk(3)
    b_q, b_k, b_v = bias.chunk(3)

    def split(x, w, bias):
        return F.linear(x, w, bias).view(b, x.shape[1], heads, c // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(query, w_q, b_q), split(key, w_k, b_k), split(value, w_v, b_v),
                                         attn_mask=allowed, dropout_p=mha.dropout if mha.training else 0.0)
    return mha.out_proj(out.transpose(1, 2).reshape(b, n, c))


class DecoderLayer(nn.Module):
    """Masked cross-attention to image features, then self-attention among queries, then an FFN."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, dim))
        self.sub = nn.ModuleList(_SubLayer(dim, pre_norm, dropout) for _ in range(3))
        # Mask2Former: every matrix of the attention and FFN sub-layers xavier-uniform (norms and biases as built)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, q: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor,
                allowed: Optional[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            q, query_pos: (B, Q, C) query content and positional embedding.
            memory, memory_pos: (B, L, C) flattened features of one level and their encoding.
            allowed: (B, 1, Q, L) bool, True where a query may look (its predicted foreground); or None.
        """
        q = self.sub[0](q, lambda x: attend(self.cross_attn, x + query_pos, memory + memory_pos, memory, allowed))
        q = self.sub[1](q, lambda x: attend(self.self_attn, x + query_pos, x + query_pos, x))
        return self.sub[2](q, self.ffn)


class MLP(nn.Sequential):
    """`layers` Linear layers with ReLU between them."""

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
                 num_levels: int = 3, dropout: float = 0.0, pre_norm: bool = False, class_head: str = "fcclip"):
        """
        Args:
            in_channels: channels of the pixel decoder's multi-scale levels.
            mask_dim: channels of the mask features.
            embed_dim: size of the CLIP text embeddings the class embeddings are compared with.
            hidden_dim, num_queries, heads, ffn_dim, layers, dropout, pre_norm: decoder shape.
            num_levels: levels attended, round robin from the coarsest.
            class_head: "fcclip" (3-layer MLP over the normed query plus LayerNorm + Linear of the mask features
                averaged over the query's predicted mask, FC-CLIP's in-vocabulary head) or "linear" (one Linear
                on the normed query, ovseg's earlier head).
        """
        super().__init__()
        if layers < 1 or num_queries < 1 or num_levels < 1:
            raise ValueError(f"MODEL.MASK_SEG.DECODER: LAYERS={layers}, NUM_QUERIES={num_queries} and "
                             f"NUM_LEVELS={num_levels} must be positive")
        if hidden_dim % 4:
            raise ValueError(f"MODEL.MASK_SEG.DECODER.HIDDEN_DIM={hidden_dim} must be divisible by 4")
        if class_head not in CLASS_HEADS:
            raise ValueError(f"MODEL.MASK_SEG.DECODER.CLASS_HEAD={class_head!r}; use one of {list(CLASS_HEADS)}")
        self.num_levels = num_levels
        self.num_queries = num_queries
        self.class_head = class_head
        self.input_proj = nn.ModuleList(self._input_proj(in_channels, hidden_dim) for _ in range(num_levels))
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_pos = nn.Embedding(num_queries, hidden_dim)
        self.layers = nn.ModuleList(DecoderLayer(hidden_dim, heads, ffn_dim, dropout, pre_norm) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden_dim)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        if class_head == "fcclip":
            self.mask_pooling_proj = nn.Sequential(nn.LayerNorm(mask_dim), nn.Linear(mask_dim, hidden_dim))
            self.class_embed = MLP(hidden_dim, hidden_dim, embed_dim, 3)  # into CLIP text space
        else:
            self.class_embed = nn.Linear(hidden_dim, embed_dim)

    @staticmethod
    def _input_proj(in_channels: int, hidden_dim: int) -> nn.Module:
        if in_channels == hidden_dim:
            return nn.Identity()
        conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
        weight_init.c2_xavier_fill(conv)  # Mask2Former's initialisation of its input projections
        return conv

    @classmethod
    def from_config(cls, cfg, in_channels: int, mask_dim: int, embed_dim: int):
        d = cfg.MODEL.MASK_SEG.DECODER
        return {
            "in_channels": in_channels, "mask_dim": mask_dim, "embed_dim": embed_dim,
            "hidden_dim": d.HIDDEN_DIM, "num_queries": d.NUM_QUERIES, "heads": d.HEADS, "ffn_dim": d.FFN_DIM,
            "layers": d.LAYERS, "num_levels": d.NUM_LEVELS, "dropout": d.DROPOUT, "pre_norm": d.PRE_NORM,
            "class_head": d.CLASS_HEAD,
        }

    def class_embeddings(self, q: torch.Tensor, masks: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
        """(B, Q, C) normed queries, their (B, Q, h, w) mask logits and the (B, mask_dim, h, w) mask features ->
        (B, Q, D) class embeddings."""
        if self.class_head == "linear":
            return self.class_embed(q)
        # FC-CLIP: average the mask features over each query's predicted foreground; the mask only selects
        # (no gradient through it), the features carry the gradient
        pooled = pool_masks(mask_features, (masks.detach() > 0).to(mask_features.dtype))  # (B, Q, mask_dim)
        return self.class_embed(q + self.mask_pooling_proj(pooled))

    @staticmethod
    def attention_mask(mask_logits: torch.Tensor) -> torch.Tensor:
        """(B, Q, h, w) mask logits at a level's size -> (B, 1, Q, h * w) bool, True on the predicted
        foreground. A query with an empty mask would attend to nothing (NaN): it sees the whole level."""
        allowed = mask_logits.detach().flatten(2) >= 0  # sigmoid >= 0.5
        # not a boolean-indexed write: that reads the number of empty masks back to the host
        allowed |= ~allowed.any(dim=-1, keepdim=True)
        return allowed[:, None]

    def forward(self, multi_scale: List[torch.Tensor], mask_features: torch.Tensor) -> Dict[str, object]:
        """
        Args:
            multi_scale: pixel-decoder levels (B, C, h_l, w_l), coarsest first (at least `num_levels`).
            mask_features: (B, mask_dim, h, w).
        Returns:
            {"pred_embeds": (B, Q, D), "pred_masks": (B, Q, h, w) logits, "aux_outputs": in training, the same
            for the input to the first layer and every layer but the last, in order; at inference, empty}.
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
            # Mask2Former adds the level embedding to the memory itself, i.e. to keys and values: added to the
            # keys only it would be a constant shift inside the level's softmax and do nothing
            memories.append(x.flatten(2).transpose(1, 2) + self.level_embed.weight[i].to(x.dtype))  # (B, hw, C)
            pos = sine_position_encoding(h, w, x.shape[1], x.device, x.dtype).flatten(1).t()
            poses.append(pos[None])
        if not self.training:
            # Resizing is linear, so masks predicted on resized mask features equal the resized full masks:
            # at inference, where only the last layer's masks are output, the others stay at the level's size.
            level_features = [F.interpolate(mask_features, size=s, mode="bilinear", align_corners=False)
                              for s in sizes]
        q = self.query_feat.weight[None].expand(b, -1, -1)  # (B, Q, C)
        qpos = self.query_pos.weight[None].expand(b, -1, -1)
        predictions = []
        for i in range(len(self.layers) + 1):  # step i predicts from the input to layer i (the last: the output)
            normed = self.norm(q)
            mask_embeds = self.mask_embed(normed)  # (B, Q, mask_dim)
            last = i == len(self.layers)
            if self.training or last:
                masks = torch.einsum("bqc,bchw->bqhw", mask_embeds, mask_features)
                predictions.append((self.class_embeddings(normed, masks, mask_features), masks))
            if last:
                break
            lvl = i % self.num_levels
            if self.training:
                small = F.interpolate(masks.detach(), size=sizes[lvl], mode="bilinear", align_corners=False)
            else:
                small = torch.einsum("bqc,bchw->bqhw", mask_embeds, level_features[lvl])
            q = self.layers[i](q, qpos, memories[lvl], poses[lvl], self.attention_mask(small))
        return {
            "pred_embeds": predictions[-1][0],
            "pred_masks": predictions[-1][1],
            "aux_outputs": [{"pred_embeds": e, "pred_masks": m} for e, m in predictions[:-1]],
        }
