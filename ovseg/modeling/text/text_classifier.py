"""CLIP text tower turning a vocabulary into class embeddings: frozen with a per-class cache, or trainable."""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Dict, Optional, Sequence, Tuple, Union

import open_clip
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils import comm
from torch import nn
from tqdm import tqdm

from ..clip_model import load_clip_towers
from .vocabulary import Vocabulary, get_templates, parse_vocabulary

logger = logging.getLogger(__name__)

# encodings of at least this many text-encoder forwards show a progress bar (2,000 classes x 80 templates take minutes)
PROGRESS_MIN_FORWARDS = 4


class TextClassifier(nn.Module):
    """Class embeddings (C, D), L2-normalised, from prompt-ensembled synonyms.

    Each class's embedding is the normalised mean of the normalised embeddings of every
    (synonym, template) prompt. Embeddings are cached per (templates, synonyms), so a repeated vocabulary, or
    a new one sharing classes with an earlier one, costs no text-encoder forward for the known classes. The
    text tower's weights are fixed for the life of the object, so they need not be part of the key.

    With `trainable` the tower trains with the model instead: nothing is cached (the weights change) and the
    embeddings carry gradients whenever autograd is on.
    """

    @configurable
    def __init__(self, *, text_model: nn.Module, tokenizer, templates: Sequence[str] = ("a photo of a {}.",),
                 batch_size: int = 1024, trainable: bool = False):
        """
        Args:
            text_model: an open_clip model with `encode_text` (its visual tower may be removed).
            tokenizer: the matching open_clip tokenizer.
            templates: prompt templates with one "{}" each.
            batch_size: prompts per text-encoder forward.
            trainable: train the text tower (MODEL.TEXT.TRAINABLE): no cache, no `no_grad`.
        """
        super().__init__()
        if not templates or any("{}" not in t for t in templates):
            raise ValueError("every prompt template needs a '{}' placeholder")
        self.trainable = trainable
        self.text_model = text_model.eval()
        for p in self.text_model.parameters():
            p.requires_grad_(trainable)
        self.tokenizer = tokenizer
        self.templates = tuple(templates)
        self.batch_size = batch_size
        self._cache: Dict[Tuple[Tuple[str, ...], Tuple[str, ...]], torch.Tensor] = {}
        self.num_encoder_forwards = 0  # text-encoder forwards so far (cache misses cost these)

    @classmethod
    def from_config(cls, cfg, text_model: Optional[nn.Module] = None):
        if text_model is None:
            _, text_model = load_clip_towers(cfg)
        return {
            "text_model": text_model,
            "tokenizer": open_clip.get_tokenizer(cfg.MODEL.CLIP.MODEL_NAME),
            "templates": get_templates(cfg.MODEL.TEXT.TEMPLATES),
            "batch_size": cfg.MODEL.TEXT.BATCH_SIZE,
            "trainable": cfg.MODEL.TEXT.TRAINABLE,
        }

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.trainable:
            self.text_model.eval()  # frozen: never dropout
        return self

    @property
    def device(self) -> torch.device:
        return next(self.text_model.parameters()).device

    def _encode_classes(self, classes: Sequence[Tuple[str, ...]], per_template: bool = False) -> torch.Tensor:
        """(C, D) normalised class embeddings ((C, P, D) `per_template`), gradients flowing only when the tower is
        trainable."""
        # cached embeddings outlive the caller's autocast: a frozen tower encodes in full precision, so the cache
        # never hands bf16-rounded embeddings to a later fp32 run
        precision = nullcontext() if self.trainable else torch.autocast(self.device.type, enabled=False)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()), precision:
            return self._encode_prompts(classes, per_template)

    def _encode_prompts(self, classes: Sequence[Tuple[str, ...]], per_template: bool = False) -> torch.Tensor:
        prompts, owner = [], []
        num_t = len(self.templates)
        for i, synonyms in enumerate(classes):
            for name in synonyms:
                for j, t in enumerate(self.templates):
                    prompts.append(t.format(name))
                    owner.append(i * num_t + j if per_template else i)
        embeds = []
        starts = range(0, len(prompts), self.batch_size)
        long = len(starts) >= PROGRESS_MIN_FORWARDS
        if long:
            logger.info("encoding %d classes (%d prompts: synonyms x %d templates) in %d text-encoder forwards",
                        len(classes), len(prompts), len(self.templates), len(starts))
        # one bar per job, not per process
        for start in tqdm(starts, desc="text encoding", unit="batch", disable=not (long and comm.is_main_process())):
            tokens = self.tokenizer(prompts[start:start + self.batch_size]).to(self.device)
            embeds.append(F.normalize(self.text_model.encode_text(tokens).float(), dim=-1))
            self.num_encoder_forwards += 1
        embeds = torch.cat(embeds)  # (num_prompts, D)
        owner = torch.tensor(owner, device=embeds.device)
        rows = len(classes) * (num_t if per_template else 1)
        sums = torch.zeros(rows, embeds.shape[1], device=embeds.device).index_add_(0, owner, embeds)
        sums = sums.view(len(classes), num_t, -1) if per_template else sums
        return F.normalize(sums, dim=-1)  # normalising the sum = normalising the mean

    def forward(self, vocabulary: Union[str, Sequence[str], Vocabulary]) -> torch.Tensor:
        """Returns (C, D) normalised class embeddings for `vocabulary` (anything `parse_vocabulary` takes), each
        class's synonyms averaged."""
        vocab = parse_vocabulary(vocabulary)
        if self.trainable:  # the weights change every step: encode afresh, keep nothing
            return self._encode_classes(vocab.classes).to(self.device)
        missing = [c for c in dict.fromkeys(vocab.classes) if (self.templates, c) not in self._cache]
        if missing:
            logger.debug("encoding %d new classes x %d templates", len(missing), len(self.templates))
            for c, e in zip(missing, self._encode_classes(missing)):
                self._cache[(self.templates, c)] = e
        return torch.stack([self._cache[(self.templates, c)] for c in vocab.classes]).to(self.device)

    def template_embeddings(self, vocabulary: Union[str, Sequence[str], Vocabulary], synonyms: str = "first"
                            ) -> torch.Tensor:
        """(C, P, D) normalised embeddings of every class under each of the P templates on its own (CAT-Seg's cost
        volume has a channel per template). `synonyms`: "first" (the display name only, CAT-Seg's rule) or
        "mean" (a template's embeddings of the class's synonyms averaged). Cached like `forward`."""
        if synonyms not in ("first", "mean"):
            raise ValueError(f"synonyms={synonyms!r}; use 'first' or 'mean'")
        vocab = parse_vocabulary(vocabulary)
        classes = [c[:1] if synonyms == "first" else c for c in vocab.classes]
        if self.trainable:
            return self._encode_classes(classes, per_template=True).to(self.device)
        key = ("per-template",) + self.templates
        missing = [c for c in dict.fromkeys(classes) if (key, c) not in self._cache]
        if missing:
            for c, e in zip(missing, self._encode_classes(missing, per_template=True)):
                self._cache[(key, c)] = e
        return torch.stack([self._cache[(key, c)] for c in classes]).to(self.device)

    def synonym_embeddings(self, vocabulary: Union[str, Sequence[str], Vocabulary]
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every synonym on its own, for the rule "one query per synonym, max over a class's synonyms" of
        SCLIP / ClearCLIP / NACLIP (after the softmax) and FC-CLIP / OpenSeg (over the logits).

        Returns:
            (S, D) normalised embeddings (templates averaged per synonym), S = total number of synonyms, and
            (S,) int64 `owner`: the class index of each synonym (see `max_over_synonyms`).
        """
        singles, owner = parse_vocabulary(vocabulary).per_synonym()
        return self(singles), torch.tensor(owner, dtype=torch.long, device=self.device)


def max_over_synonyms(values: torch.Tensor, owner: torch.Tensor, num_classes: int, dim: int = -1) -> torch.Tensor:
    """(..., S, ...) per-synonym values along `dim` -> (..., C, ...) per-class maxima, `owner` (S,) giving each
    synonym's class. When every class has one synonym it is the identity (no copy)."""
    if values.shape[dim] == num_classes:
        return values
    dim = dim % values.dim()
    shape = [1] * values.dim()
    shape[dim] = -1
    index = owner.to(values.device).view(shape).expand_as(values)
    out_shape = list(values.shape)
    out_shape[dim] = num_classes
    out = values.new_full(out_shape, float("-inf"))
    return out.scatter_reduce_(dim, index, values, reduce="amax")
