"""Open-vocabulary classification of mask queries: the trained in-vocabulary classifier, the frozen
out-of-vocabulary classifier (CLIP features pooled in each mask) and their geometric ensemble, by FC-CLIP's
rules (`fcclip/fcclip.py` and `MaskPooling` / `get_classification_logits` in its transformer decoder,
bytedance/fc-clip@2b0bbe2); and ViLD's image head with its ensemble (Gu et al., ICLR 2022; the rules read in
tensorflow/tpu@7dc921f, models/official/detection/projects/vild: `modeling/vild_head.py`,
`ops/postprocess_ops.py`)."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .region_pooling import pool_masks
from .text import max_over_synonyms
from .transformer_decoder.masked_attention import MLP


class ClassText(NamedTuple):
    """The text side of both classifiers: (S, D) normalised embeddings for C classes. With `owner` (S,) (the
    class of each row), a row per synonym and a class's logit is the max over its synonyms' logits (FC-CLIP,
    OpenSeg, ODISE); without, S = C and each row is a class (e.g. its synonyms' mean embedding)."""
    embeds: torch.Tensor
    num_classes: int
    owner: Optional[torch.Tensor] = None

    def reduce(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., S) per-row logits -> (..., C) per-class logits."""
        if self.owner is None:
            return logits
        return max_over_synonyms(logits, self.owner, self.num_classes)


def as_class_text(text: Union[torch.Tensor, ClassText]) -> ClassText:
    """A (C, D) tensor is one row per class."""
    return text if isinstance(text, ClassText) else ClassText(text, len(text))


class InVocabClassifier(nn.Module):
    """logits = scale * cos(query embedding, [text embeddings; learned void embedding]).

    The void ("no object") embedding is learned, as ViLD's background embedding, so a vocabulary change never
    needs a retrained output layer.
    """

    # own parameters that are embeddings (learned tokens, FC-CLIP's nn.Embedding): the optimizer gives them
    # SOLVER.WEIGHT_DECAY_EMBED, as it does nn.Embedding modules (ovseg.engine.trainer.weight_decay_of)
    embedding_parameters = ("void_embedding",)

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

    def forward(self, embeds: torch.Tensor, text: Union[torch.Tensor, ClassText]) -> torch.Tensor:
        """(B, Q, D) query embeddings and the classes' text ((C, D) normalised, or `ClassText`) -> (B, Q, C + 1)
        logits, last = void."""
        text = as_class_text(text)
        rows = torch.cat([text.embeds.to(embeds.dtype), F.normalize(self.void_embedding, dim=-1).to(embeds.dtype)])
        logits = self.scale * F.normalize(embeds, dim=-1) @ rows.t()  # (B, Q, S + 1)
        return torch.cat([text.reduce(logits[..., :-1]), logits[..., -1:]], dim=-1)


def out_of_vocab_logits(dense: torch.Tensor, masks: torch.Tensor, text: Union[torch.Tensor, ClassText],
                        scale: float = 100.0, binary: bool = False) -> torch.Tensor:
    """Frozen-CLIP classification of each mask.

    Args:
        dense: (B, D, h, w) `clip_dense` features.
        masks: (B, Q, H, W) mask probabilities, or mask logits with `binary` (any resolution; resized to
            (h, w) by `pool_masks`).
        text: (C, D) normalised text embeddings, or `ClassText`.
        binary: pool over the binarised masks (FC-CLIP) instead of weighting by the probabilities.
    Returns:
        (B, Q, C) logits = scale * cos(mask-averaged CLIP feature, text).
    """
    text = as_class_text(text)
    pooled = F.normalize(pool_masks(dense, masks, binary=binary), dim=-1)  # (B, Q, D)
    return text.reduce(scale * pooled @ text.embeds.to(pooled.dtype).t())


def geometric_ensemble(in_logits: torch.Tensor, out_logits: torch.Tensor, seen: torch.Tensor, alpha: float,
                       beta: float, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FC-CLIP's geometric ensemble of the two classifiers.

    With p_in = softmax over the C classes (void left out) of `in_logits` and p_out = softmax over the C
    classes of `out_logits`, each class gets e_c = p_in[c]^(1 - w_c) * p_out[c]^w_c, w_c = alpha for seen
    classes and beta for unseen ones (0 for the queries where `valid` is False: the in-vocabulary classifier
    alone). The void probability v is the in-vocabulary classifier's over all C + 1 entries:
    p = [(1 - v) * e / sum(e), v], and, as FC-CLIP's post-processing reads softmax(log(p + 1e-8)), that is
    what is returned. Computed in log space (FC-CLIP's product underflows to log 0 for very unlikely classes).

    Args:
        in_logits: (..., C + 1); out_logits: (..., C); seen: (C,) bool; valid: (...) bool or None.
    Returns:
        (..., C + 1) probabilities.
    """
    log_in = in_logits[..., :-1].float().log_softmax(-1)
    log_out = out_logits.float().log_softmax(-1)
    w = torch.where(seen.to(log_in.device), torch.tensor(alpha), torch.tensor(beta)).to(log_in)  # (C,)
    if valid is not None:
        w = w * valid[..., None].to(w)
    ensemble = ((1 - w) * log_in + w * log_out).softmax(-1)  # e / sum(e)
    void = in_logits.float().softmax(-1)[..., -1:]
    return torch.cat([ensemble * (1 - void), void], dim=-1).add_(1e-8).log_().softmax(-1)


class ImageEmbeddingHead(nn.Module):
    """ViLD-image's region embedding: each query's class embedding mapped into CLIP's image-embedding space.

    Trained by an L1 distillation towards the frozen CLIP embedding of the query's region
    (`SetCriterion.image_embed_loss`); at inference it classifies like CLIP does an image, against the same text
    embeddings, for ViLD's ensemble (`vild_ensemble`). ViLD's own head ends in one Linear ("project-to-clip"); here
    it sits on the class embedding the in-vocabulary classifier also reads, so `layers` > 1 gives the image branch
    capacity of its own (ViLD-ensemble's separate branch has several layers).
    """

    def __init__(self, embed_dim: int, layers: int = 2, logit_scale: float = 100.0):
        """
        Args:
            embed_dim: D, the CLIP embedding size (input and output).
            layers: Linear layers of the MLP (ReLU between them); 1 = ViLD's single projection.
            logit_scale: multiplier of the cosine similarities to text (ViLD: temperature 0.01, i.e. 100).
        """
        super().__init__()
        if layers < 1:
            raise ValueError(f"MODEL.MASK_SEG.VILD.HEAD_LAYERS={layers} must be at least 1")
        if logit_scale <= 0:
            raise ValueError(f"MODEL.MASK_SEG.VILD.IMAGE_LOGIT_SCALE={logit_scale} must be positive")
        self.proj = MLP(embed_dim, embed_dim, embed_dim, layers)
        self.logit_scale = logit_scale

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """(..., D) query class embeddings -> (..., D) L2-normalised region embeddings (ViLD normalises them)."""
        return F.normalize(self.proj(embeds), dim=-1)

    def logits(self, region_embeds: torch.Tensor, text: Union[torch.Tensor, ClassText]) -> torch.Tensor:
        """(..., D) normalised region embeddings -> (..., C) logits = scale * cos(region, text); no void class
        (ViLD's image head has no background)."""
        text = as_class_text(text)
        return text.reduce(self.logit_scale * region_embeds @ text.embeds.to(region_embeds.dtype).t())


def vild_ensemble(text_logits: torch.Tensor, image_logits: torch.Tensor, seen: torch.Tensor, alpha: float,
                  beta: float) -> torch.Tensor:
    """ViLD's ensemble of its text and image heads, as log scores.

    p_text = softmax of `text_logits` over the C classes and the background (void), its class entries kept as they
    are (not renormalised); p_image = softmax of `image_logits` over the C classes. Each class scores
    s_c = p_text[c]^(1 - w_c) * p_image[c]^w_c with w_c = alpha for seen (base) classes and beta for unseen
    (novel) ones: ViLD's lambda = 2/3 is alpha = 1/3, beta = 2/3 (the text head dominates on base classes, the image
    head on novel ones; the authors' code writes it as the cube root of p_text * p_image * (p_text or p_image)).
    ViLD ranks detections by s_c without renormalising; the void entry here is the text head's background
    probability, so that the shared post-processing can drop void queries.

    Args:
        text_logits: (..., C + 1), last = void; image_logits: (..., C); seen: (C,) bool.
    Returns:
        (..., C + 1) log([s_1 .. s_C, p_text[void]]) in float32 (its exp is ViLD's scores).
    """
    log_text = text_logits.float().log_softmax(-1)
    log_image = image_logits.float().log_softmax(-1)
    w = torch.where(seen.to(log_text.device), torch.tensor(alpha), torch.tensor(beta)).to(log_text)  # (C,)
    scores = (1 - w) * log_text[..., :-1] + w * log_image
    return torch.cat([scores, log_text[..., -1:]], dim=-1)
