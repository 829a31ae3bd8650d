"""Vocabularies: which classes to segment, each with synonyms.

Format (CLI strings, `MODEL.TEXT.VOCABULARY`, class-list files and dataset metadata alike):
  - classes are separated by commas in a string (``"cat,sofa|couch"``) or one per line in a text file;
  - a class's synonyms are separated by ``|`` (``sofa|couch``); their embeddings are averaged;
  - the first synonym is the display name.

Text files (UTF-8; a byte-order mark is ignored): ``#`` starts a comment anywhere on a line, blank lines are
skipped, and a comma in a line is an error (one class per line; a comma-separated list belongs on the command line).

Errors: an empty vocabulary, a blank name, a display name used twice (case-insensitive), a synonym repeated within
a class, and a spec that looks like a file path (contains ``/`` or ends in ``.txt``) when no such file exists.
A file inside the installed package is named ``ovseg://data/class_lists/...`` (the shipped configs do so).
A name may be a synonym of several classes, or a synonym of one class and another class's display name: each of
those classes then scores it (the published ADE-150/847 lists do this, e.g. ``stool`` is a class and a synonym of
``toilet``). For vocabularies typed by the user (strings, files) such shared names are logged as a warning, since
there they are more often a slip than intended.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import open_clip

from ...utils.paths import resolve_package_path

logger = logging.getLogger(__name__)

# Prompt template sets: CLIP's 80 ImageNet prompts and its short selection (from open_clip), and the 14 ViLD-style
# prompts FC-CLIP trains and tests with (VILD_PROMPT in github.com/bytedance/fc-clip fcclip/fcclip.py, commit
# 2b0bbe213070d44da9182530fa2e826fef03f974; data, kept verbatim, punctuation included).
TEMPLATE_SETS = {
    "imagenet": tuple(t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES),
    "simple": tuple(t("{}") for t in open_clip.SIMPLE_IMAGENET_TEMPLATES),
    "single": ("a photo of a {}.",),
    "name": ("{}",),  # the bare class name (LSeg encodes its labels so)
    # CAT-Seg's PROMPT_ENSEMBLE_TYPE "single" (KU-CVLAB/CAT-Seg cat_seg/modeling/transformer/cat_seg_predictor.py)
    "catseg": ("A photo of a {} in the scene",),
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

    def per_synonym(self) -> Tuple["Vocabulary", List[int]]:
        """Every synonym as a one-name class of its own (classes in order, each's names in order), and the index of
        the class each came from: the layout of the rule "one query per synonym, max over a class's synonyms"."""
        singles = Vocabulary(tuple((s,) for c in self.classes for s in c))
        return singles, [i for i, c in enumerate(self.classes) for _ in c]

    def summary(self, max_names: int = 20) -> str:
        """For logs: the count and the first `max_names` display names, not a 20 KB line for 2,000 classes."""
        names = self.names
        more = f", ... (+{len(names) - max_names} more)" if len(names) > max_names else ""
        return f"{len(names)} classes: {', '.join(names[:max_names])}{more}"


def _parse_class(entry: str, where: str) -> Tuple[str, ...]:
    synonyms = tuple(s.strip() for s in entry.split("|"))
    if not entry.strip() or any(not s for s in synonyms):
        raise ValueError(f"vocabulary {where}: blank class name in {entry!r}")
    if len({s.lower() for s in synonyms}) != len(synonyms):
        raise ValueError(f"vocabulary {where}: a synonym is repeated within the class {entry!r}")
    return synonyms


def _shared_names(classes: Sequence[Tuple[str, ...]]) -> dict:
    """name (lower case) -> display names of the classes it belongs to, for names in more than one class."""
    owners: dict = {}
    for c in classes:
        for s in c:
            owners.setdefault(s.lower(), []).append(c[0])
    return {n: o for n, o in owners.items() if len(o) > 1}


def make_vocabulary(entries: Sequence[str], where: str = "", warn_shared: bool = True) -> Vocabulary:
    """Build a vocabulary from class entries (``"sofa|couch"``), checking for blanks and duplicates.

    Args:
        entries: one string per class, synonyms joined by ``|``.
        where: how error messages name the source.
        warn_shared: log a warning for names that belong to several classes (see the module docstring).
    """
    if len(entries) == 0:
        raise ValueError(f"vocabulary {where} is empty: give at least one class, e.g. --vocab 'cat,sofa'")
    classes = tuple(_parse_class(e, where) for e in entries)
    seen = {}
    for c in classes:
        key = c[0].lower()
        if key in seen:
            raise ValueError(f"vocabulary {where}: duplicate class name {c[0]!r}")
        seen[key] = c
    shared = _shared_names(classes) if warn_shared else {}
    if shared:
        listed = "; ".join(f"{n!r} in {o}" for n, o in list(shared.items())[:5])
        logger.warning("vocabulary %s: %d name(s) belong to several classes, each of which scores them: %s%s",
                       where, len(shared), listed, " ..." if len(shared) > 5 else "")
    return Vocabulary(classes)


_PATH_SUFFIXES = (".txt", ".csv", ".names", ".lst")


def _looks_like_path(spec: str) -> bool:
    """A spec meant as a file: a path separator or a list-file suffix, and no class separators."""
    if "," in spec or "|" in spec:
        return False
    return "/" in spec or os.sep in spec or spec.strip().lower().endswith(_PATH_SUFFIXES)


def read_vocabulary_file(path: str) -> Vocabulary:
    """One class per line (UTF-8, BOM ignored); ``#`` starts a comment anywhere; a comma in a line is an error."""
    entries = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            if "," in entry:
                raise ValueError(
                    f"vocabulary file {path!r} line {lineno}: {entry!r} has a comma, but a file holds one class per "
                    "line (synonyms joined by '|'); put each class on its own line"
                )
            entries.append(entry)
    return make_vocabulary(entries, f"file {path!r}")


def parse_vocabulary(spec: Union[str, Sequence[str], Vocabulary]) -> Vocabulary:
    """Parse a vocabulary given as a comma-separated string, a text file path, a list of entries, or a
    registered detectron2 dataset name (its metadata's `vocabulary`, else `stuff_classes`); `ovseg://` names a
    file inside the package."""
    if isinstance(spec, Vocabulary):
        return spec
    if not isinstance(spec, str):
        return make_vocabulary(list(spec), "(list)")
    path = resolve_package_path(spec)
    if os.path.isfile(path):
        return read_vocabulary_file(path)
    from detectron2.data import MetadataCatalog

    if spec in MetadataCatalog.list():
        return vocabulary_from_metadata(MetadataCatalog.get(spec))
    if _looks_like_path(spec):
        raise FileNotFoundError(
            f"vocabulary {spec!r} looks like a file path, but there is no such file (a one-class vocabulary "
            "with '/' in its name: add a synonym with '|', e.g. 'tv/monitor|tv')"
        )
    if not spec.strip():
        raise ValueError("vocabulary is empty: give at least one class, e.g. --vocab 'cat,sofa'")
    return make_vocabulary(spec.split(","), repr(spec))


def vocabulary_from_metadata(metadata) -> Vocabulary:
    entries = metadata.get("vocabulary", None) or metadata.get("stuff_classes", None)
    if not entries:
        raise ValueError(f"dataset {metadata.name!r} has no `vocabulary` or `stuff_classes` in its metadata")
    # the published lists share names between classes on purpose (ADE's "stool"): no warning for them
    return make_vocabulary(list(entries), f"of dataset {metadata.name!r}", warn_shared=False)


def dataset_vocabulary(name: str) -> Tuple[Vocabulary, Optional[List[bool]]]:
    """A registered dataset's vocabulary and, per class, whether it is a thing (None when the metadata does not
    say: a semantic-only dataset)."""
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(name)
    vocab = vocabulary_from_metadata(meta)
    things = meta.get("thing_dataset_id_to_contiguous_id", None)
    if things is None:
        return vocab, None
    contiguous = set(things.values())
    return vocab, [i in contiguous for i in range(len(vocab))]


def is_registered_dataset(spec) -> bool:
    """Whether a vocabulary spec names a registered detectron2 dataset."""
    from detectron2.data import DatasetCatalog

    return isinstance(spec, str) and spec in DatasetCatalog.list()
