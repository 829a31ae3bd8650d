"""Vocabularies: which classes to segment, each with synonyms.

Format (CLI strings, `MODEL.TEXT.VOCABULARY`, class-list files and dataset metadata alike):
  - classes are separated by commas in a string (``"cat,sofa|couch"``) or one per line in a text file;
  - a class's synonyms are separated by ``|`` (``sofa|couch``); their embeddings are averaged;
  - the first synonym is the display name.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import open_clip

# Prompt template sets: CLIP's 80 ImageNet prompts and its short selection (from open_clip), and the 14 ViLD-style
# prompts FC-CLIP trains and tests with (VILD_PROMPT in github.com/bytedance/fc-clip fcclip/fcclip.py, commit
# 2b0bbe213070d44da9182530fa2e826fef03f974; data, kept verbatim, punctuation included).
TEMPLATE_SETS = {
    "imagenet": tuple(t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES),
    "simple": tuple(t("{}") for t in open_clip.SIMPLE_IMAGENET_TEMPLATES),
    "single": ("a photo of a {}.",),
    "vild": (
        "a photo of a {}.",
        "This is a photo of a {}",
        "There is a {} in the scene",
        "There is the {} in the scene",
        "a photo of a {} in the scene",
        "a photo of a small {}.",
        "a photo of a medium {}.",
        "a photo of a large {}.",
        "This is a photo of a small {}.",
        "This is a photo of a medium {}.",
        "This is a photo of a large {}.",
        "There is a small {} in the scene.",
        "There is a medium {} in the scene.",
        "There is a large {} in the scene.",
    ),
}


def get_templates(name: str) -> Tuple[str, ...]:
    if name not in TEMPLATE_SETS:
        raise ValueError(f"MODEL.TEXT.TEMPLATES={name!r}; choose one of {sorted(TEMPLATE_SETS)}")
    return TEMPLATE_SETS[name]


@dataclass(frozen=True)
class Vocabulary:
    """An ordered tuple of classes, each a tuple of synonyms (first = display name)."""

    classes: Tuple[Tuple[str, ...], ...]

    @property
    def names(self) -> list:
        return [c[0] for c in self.classes]

    def __len__(self) -> int:
        return len(self.classes)

    def to_strings(self) -> list:
        return ["|".join(c) for c in self.classes]


def _parse_class(entry: str, where: str) -> Tuple[str, ...]:
    synonyms = tuple(s.strip() for s in entry.split("|"))
    if not entry.strip() or any(not s for s in synonyms):
        raise ValueError(f"vocabulary {where}: blank class name in {entry!r}")
    return synonyms


def make_vocabulary(entries: Sequence[str], where: str = "") -> Vocabulary:
    """Build a vocabulary from class entries (``"sofa|couch"``), checking for blanks and duplicates."""
    if len(entries) == 0:
        raise ValueError(f"vocabulary {where} is empty: give at least one class, e.g. --vocab 'cat,sofa'")
    classes = tuple(_parse_class(e, where) for e in entries)
    seen = {}
    for c in classes:
        key = c[0].lower()
        if key in seen:
            raise ValueError(f"vocabulary {where}: duplicate class name {c[0]!r}")
        seen[key] = c
    return Vocabulary(classes)


def parse_vocabulary(spec: Union[str, Sequence[str], Vocabulary]) -> Vocabulary:
    """Parse a vocabulary given as a comma-separated string, a text file path, a list of entries, or a
    registered detectron2 dataset name (its metadata's `vocabulary`, else `stuff_classes`)."""
    if isinstance(spec, Vocabulary):
        return spec
    if not isinstance(spec, str):
        return make_vocabulary(list(spec), "(list)")
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        return make_vocabulary(lines, f"file {spec!r}")
    from detectron2.data import MetadataCatalog

    if spec in MetadataCatalog.list():
        return vocabulary_from_metadata(MetadataCatalog.get(spec))
    if not spec.strip():
        raise ValueError("vocabulary is empty: give at least one class, e.g. --vocab 'cat,sofa'")
    return make_vocabulary(spec.split(","), repr(spec))


def vocabulary_from_metadata(metadata) -> Vocabulary:
    entries = metadata.get("vocabulary", None) or metadata.get("stuff_classes", None)
    if not entries:
        raise ValueError(f"dataset {metadata.name!r} has no `vocabulary` or `stuff_classes` in its metadata")
    return make_vocabulary(list(entries), f"of dataset {metadata.name!r}")


class VocabularyMixin:
    """The test vocabulary of a meta-architecture: parsed from `_vocabulary_spec` on first use (so a dataset name
    may be registered after the model is built), switched with `set_vocabulary` without rebuilding the model."""

    _vocabulary: Optional[Vocabulary] = None
    _vocabulary_spec = None

    @property
    def vocabulary(self) -> Vocabulary:
        if self._vocabulary is None:
            if self._vocabulary_spec is None:
                raise ValueError("no vocabulary: set MODEL.TEXT.VOCABULARY, DATASETS.TEST, or call set_vocabulary()")
            self._vocabulary = parse_vocabulary(self._vocabulary_spec)
        return self._vocabulary

    def set_vocabulary(self, vocabulary) -> Vocabulary:
        """Switch the classes to segment (a string, file, list or dataset name); no rebuild needed."""
        self._vocabulary = parse_vocabulary(vocabulary)
        return self._vocabulary
