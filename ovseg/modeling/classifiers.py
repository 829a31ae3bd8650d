"""Open-vocabulary classification of mask queries: the trained in-vocabulary classifier, the frozen
out-of-vocabulary classifier (CLIP features pooled in each mask) and their geometric ensemble."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .region_pooling import pool_masks


class InVocabClassifier(nn.Module):
    """logits = scale * cos(query embedding, [text embeddings; learned void embedding]).

    The void ("no object") embedding is learned, as ViLD's background embedding, so a vocabulary change never
    needs a retrained output layer.
    """

    def __init__(self, embed_dim: int, logit_scale: float = 1 / 0.07, learn_logit_scale: bool = True,
                 max_logit_scale: float = 100.0):
        super().__init__()
        if logit_scale <= 0:
            raise ValueError(f"MODEL.MASK_SEG.CLASSIFIER.LOGIT_SCALE={logit_scale} must be positive")
        self.void_embedding = nn.Parameter(torch.randn(1, embed_dim) / math.sqrt(embed_dim))
        log_scale = torch.tensor(math.log(logit_scale))
        if learn_logit_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.max_log_scale = math.log(max_logit_scale)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp()

    def forward(self, embeds: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, Q, D) query embeddings, (C, D) normalised text -> (B, Q, C + 1) logits, last = void."""
        classes = torch.cat([text.to(embeds.dtype), F.normalize(self.void_embedding, dim=-1).to(embeds.dtype)])
        return self.scale * F.normalize(embeds, dim=-1) @ classes.t()


def out_of_vocab_logits(dense: torch.Tensor, mask_probs: torch.Tensor, text: torch.Tensor,
                        scale: float = 100.0) -> torch.Tensor:
    """Frozen-CLIP classification of each mask.

    Args:
        dense: (B, D, h, w) `clip_dense` features.
        mask_probs: (B, Q, H, W) mask probabilities (any resolution; resized to (h, w) by `pool_masks`).
        text: (C, D) normalised text embeddings.
    Returns:
        (B, Q, C) logits = scale * cos(mask-averaged CLIP feature, text).
    """
    pooled = F.normalize(pool_masks(dense, mask_probs), dim=-1)  # (B, Q, D)
    return scale * pooled @ text.to(pooled.dtype).t()


def geometric_ensemble(in_logits: torch.Tensor, out_logits: torch.Tensor, seen: torch.Tensor, alpha: float,
                       beta: float) -> torch.Tensor:
    """FC-CLIP's geometric ensemble of the two classifiers.

    With p_in = softmax over the C classes + void of `in_logits` and p_out = softmax over the C classes of
    `out_logits`, each class gets e_c = p_in[c]^(1 - w_c) * p_out[c]^w_c, w_c = alpha for seen classes and beta
    for unseen ones. The void probability stays the in-vocabulary classifier's:
    result = [(1 - p_in[void]) * e / sum(e), p_in[void]].

    Args:
        in_logits: (..., C + 1); out_logits: (..., C); seen: (C,) bool.
    Returns:
        (..., C + 1) probabilities.
    """
    p_in = in_logits.float().softmax(-1)
    log_in = p_in[..., :-1].clamp(min=1e-12).log()
    log_out = out_logits.float().log_softmax(-1)
    w = torch.where(seen.to(log_in.device), torch.tensor(alpha), torch.tensor(beta)).to(log_in)
    ensemble = ((1 - w) * log_in + w * log_out).softmax(-1)  # e / sum(e), computed in log space
    void = p_in[..., -1:]
    return torch.cat([ensemble * (1 - void), void], dim=-1)
