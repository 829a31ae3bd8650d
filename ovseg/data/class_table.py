"""Class tables of the benchmarks: dataset ids, colours, thing/stuff flags and our vocabulary (names + synonyms).

Each benchmark has two files in `ovseg/data/class_lists/`:
  - `<table>.json`: the dataset's facts, one entry per class in contiguous order (`id` = the label id in the
    official annotation files, `name` = official name, and where known `isthing`, `color`, `trainId`);
  - `<table>.txt`: our vocabulary, line i = contiguous class i, synonyms separated by `|`, the first synonym being
    the display name (ambiguous or jargon names such as COCO's `wall-other-merged` are rewritten there).
The `.txt` files are valid `MODEL.TEXT.VOCABULARY` files as they are.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import numpy as np

CLASS_LISTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "class_lists")

# The training vocabulary of the usual open-vocabulary protocol (train on COCO-Panoptic): only the reference split
# stored in the benchmarks' metadata (`seen_classes`). Models and the evaluator split by the model's own training
# vocabulary (`OpenVocabModel.training_vocabulary`), whatever it is.
REFERENCE_TRAINING_TABLE = "coco_panoptic_133"


@dataclass(frozen=True)
class ClassEntry:
    """One class of a benchmark, at its contiguous index in the table."""

    dataset_id: int  # label id in the official annotation files
    official_name: str
    synonyms: Tuple[str, ...]  # our vocabulary entry; synonyms[0] is the display name
    isthing: bool
    color: Tuple[int, int, int]

    @property
    def name(self) -> str:
        return self.synonyms[0]

    @property
    def vocabulary_entry(self) -> str:
        return "|".join(self.synonyms)


# Class 0 of the benchmarks that add a background class to a table (PC-60, COCO-Object): everything the table's
# classes do not cover. Its display name is what MODEL.DENSE_SEG.BACKGROUND_CLASS looks for.
BACKGROUND = ClassEntry(dataset_id=0, official_name="background", synonyms=("background",), isthing=False,
                        color=(0, 0, 0))


def class_list_path(table: str, ext: str = "txt") -> str:
    """Path of a packaged class list (`ext` "txt" = vocabulary, "json" = dataset facts)."""
    return os.path.join(CLASS_LISTS_DIR, f"{table}.{ext}")


def _fallback_colors(n: int) -> np.ndarray:
    # fixed seed: the same class gets the same colour in every run and every process
    return np.random.RandomState(2024).randint(0, 256, size=(n, 3))


@lru_cache(maxsize=None)
def load_class_table(table: str) -> Tuple[ClassEntry, ...]:
    """Read `<table>.json` and `<table>.txt` into one entry per class, in contiguous-id order."""
    with open(class_list_path(table, "json"), encoding="utf-8") as f:
        facts = json.load(f)
    with open(class_list_path(table, "txt"), encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    if len(facts) != len(lines):
        raise ValueError(f"class list {table}: {len(facts)} entries in the .json but {len(lines)} lines in the .txt")
    fallback = _fallback_colors(len(facts))
    entries = []
    for i, (fact, line) in enumerate(zip(facts, lines)):
        synonyms = tuple(s.strip() for s in line.split("|"))
        if not all(synonyms):
            raise ValueError(f"class list {table}.txt line {i + 1}: blank synonym in {line!r}")
        color = fact.get("color") or fallback[i].tolist()
        entries.append(
            ClassEntry(
                dataset_id=int(fact["id"]),
                official_name=fact["name"].strip(),
                synonyms=synonyms,
                isthing=bool(fact.get("isthing", 0)),
                color=tuple(int(c) for c in color),
            )
        )
    return tuple(entries)


def normalize_class_name(name: str) -> str:
    """Lower-case, `-`/`_` as spaces, single spaces: the key two class names are compared by."""
    return re.sub(r"\s+", " ", re.sub(r"[-_]", " ", name.lower())).strip()


def _synonym_keys(entry: str) -> set:
    return {normalize_class_name(s) for s in entry.split("|") if s.strip()}


def seen_class_mask(vocabulary: Sequence[str], training_vocabulary: Optional[Sequence[str]] = None) -> List[bool]:
    """The one rule for "seen": for each class of `vocabulary` ("name|syn|..." entries), whether it was trained on.

    A class is seen when one of its synonyms equals (after `normalize_class_name`) one of the synonyms of a
    training class. The models' ensemble (alpha for seen classes) and the evaluator's mIoU-seen / unseen both call
    it with the model's training vocabulary; None = the reference protocol's COCO-Panoptic 133 classes (the
    benchmarks' metadata only).
    """
    if training_vocabulary is None:
        training_vocabulary = [e.vocabulary_entry for e in load_class_table(REFERENCE_TRAINING_TABLE)]
    known = set().union(*(_synonym_keys(e) for e in training_vocabulary))
    return [bool(_synonym_keys(e) & known) for e in vocabulary]
