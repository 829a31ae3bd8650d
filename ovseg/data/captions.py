"""Captioned images (image-text training, e.g. GroupViT): two on-disk formats, their registration, and the mapper.

    captions:<file>.json   a COCO captions JSON (the layout of captions_train2017.json: "images" with id /
                           file_name, "annotations" with image_id / caption), images under <json folder>/images/
    captions:<dir>         a folder of images, each with a same-stem .txt beside it (one caption per line)

The table `CAPTION_DATASETS` names COCO's own layout (annotations/captions_<split>2017.json + <split>2017/) under
`$DETECTRON2_DATASETS`. Records: {"file_name", "image_id", "captions": [str, ...]} (+ "height" / "width" when the
JSON has them). Nothing is read at registration; a missing or malformed file is one clear error when loaded.

Noun extraction: GroupViT's code tags the caption with nltk (`pos_tag`: nouns and verbs) and prompts up to 3 of
them. nltk is not a dependency here; we find the entries of a given noun vocabulary (INPUT.CAPTIONS.NOUN_VOCABULARY:
one noun a line or comma-separated, synonyms joined by '|') in the caption, as whole words, singular or plural.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.config import configurable
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T

from ..utils.paths import resolve_package_path
from .image_io import IMAGE_SUFFIXES, image_to_tensor, read_image

logger = logging.getLogger(__name__)

PREFIX = "captions:"
CAPTIONS = "captions"  # evaluator_type: training data only, no evaluator

# name -> (captions JSON, image folder), relative to the datasets root (COCO's own layout)
CAPTION_DATASETS: Dict[str, Tuple[str, str]] = {
    "coco_2017_train_captions": ("coco/annotations/captions_train2017.json", "coco/train2017"),
    "coco_2017_val_captions": ("coco/annotations/captions_val2017.json", "coco/val2017"),
}


def _problem(name: str, message: str) -> ValueError:
    return ValueError(f"dataset {name!r}: {message} (layouts: datasets/README.md, 'Captioned images')")


def load_coco_captions(name: str, json_file: str, image_root: str) -> List[dict]:
    """One record per image of a COCO captions JSON with at least one caption."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"dataset {name!r}: no captions JSON {json_file!r}")
    with open(json_file, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise _problem(name, f"{json_file!r} is not a COCO captions JSON: it needs 'images' and 'annotations'")
    captions: Dict[int, List[str]] = {}
    for ann in data["annotations"]:
        if "caption" not in ann or "image_id" not in ann:
            raise _problem(name, f"{json_file!r}: an annotation without 'caption' / 'image_id' (an instances JSON?)")
        captions.setdefault(ann["image_id"], []).append(str(ann["caption"]).strip())
    records = []
    for im in data["images"]:
        if im["id"] in captions:
            rec = {"file_name": os.path.join(image_root, im["file_name"]), "image_id": im["id"],
                   "captions": captions[im["id"]]}
            rec.update({k: im[k] for k in ("height", "width") if k in im})
            records.append(rec)
    if not records:
        raise _problem(name, f"{json_file!r} has no captioned image")
    missing = [r["file_name"] for r in records if not os.path.isfile(r["file_name"])]
    if missing:
        raise FileNotFoundError(f"dataset {name!r}: {len(missing)} image(s) listed in {json_file!r} are missing, "
                                f"e.g. {missing[0]!r}")
    return records


def load_caption_folder(name: str, folder: str) -> List[dict]:
    """One record per image in `folder` (recursively) that has a non-empty same-stem .txt caption file."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"dataset {name!r}: no folder {folder!r}")
    records, uncaptioned = [], 0
    for root, _, files in sorted(os.walk(folder)):
        for fn in sorted(files):
            stem, suffix = os.path.splitext(fn)
            if suffix.lower() not in IMAGE_SUFFIXES:
                continue
            txt = os.path.join(root, stem + ".txt")
            lines = []
            if os.path.isfile(txt):
                with open(txt, encoding="utf-8") as f:
                    lines = [ln.strip() for ln in f if ln.strip()]
            if not lines:
                uncaptioned += 1
                continue
            records.append({"file_name": os.path.join(root, fn),
                            "image_id": os.path.relpath(os.path.join(root, stem), folder), "captions": lines})
    if not records:
        raise _problem(name, f"no image in {folder!r} has a caption file <image stem>.txt")
    if uncaptioned:
        logger.warning("%s: %d image(s) without a caption file were skipped", name, uncaptioned)
    return records


def _register(name: str, loader, image_root: str) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(evaluator_type=CAPTIONS, image_root=image_root)


def register_caption_dataset(name: str) -> None:
    """Register a `captions:<json or folder>` name (nothing is read until it is loaded)."""
    if not name.startswith(PREFIX) or not name[len(PREFIX):]:
        raise _problem(name, f"not of the form {PREFIX}<captions JSON or image folder>")
    path = os.path.abspath(os.path.expanduser(name[len(PREFIX):]))
    if path.lower().endswith(".json"):
        images = os.path.join(os.path.dirname(path), "images")
        _register(name, lambda: load_coco_captions(name, path, images), images)
    else:
        _register(name, lambda: load_caption_folder(name, path), path)


def register_caption_table(root: str) -> List[str]:
    """Register `CAPTION_DATASETS` under `root`."""
    for name, (json_file, images) in CAPTION_DATASETS.items():
        j, i = os.path.join(root, json_file), os.path.join(root, images)
        _register(name, lambda name=name, j=j, i=i: load_coco_captions(name, j, i), i)
    return list(CAPTION_DATASETS)


# ---------------------------------------------------------------------------------------------- nouns
def read_noun_vocabulary(spec: str) -> List[Tuple[str, ...]]:
    """Nouns of INPUT.CAPTIONS.NOUN_VOCABULARY: a file (one entry a line, '#' comments) or a comma-separated list;
    each entry's synonyms joined by '|'. A class-list file of ovseg's (e.g. ovseg://data/class_lists/coco_stuff_171.txt)
    works as it is."""
    path = resolve_package_path(spec)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            entries = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    elif spec.lower().endswith((".txt", ".csv", ".lst")):
        raise FileNotFoundError(f"INPUT.CAPTIONS.NOUN_VOCABULARY: no file {spec!r}")
    else:
        entries = [e.strip() for e in spec.split(",") if e.strip()]
    nouns = [tuple(s.strip().lower() for s in e.split("|") if s.strip()) for e in entries]
    return [n for n in nouns if n]


def _pattern(word: str) -> str:
    # whole words, each word's plural too ("bus" -> "buses", "sheep" stays)
    parts = [re.escape(w) + r"(?:s|es)?" for w in word.split()]
    return r"\b" + r"\s+".join(parts) + r"\b"


class NounExtractor:
    """The vocabulary entries named in a caption, in order of first mention; the matched entry's first synonym
    is returned. Longer names win over the words inside them ("traffic light" before "light")."""

    def __init__(self, vocabulary: Sequence[Tuple[str, ...]]):
        alternatives = sorted(((syn, entry[0]) for entry in vocabulary for syn in entry), key=lambda t: -len(t[0]))
        self.names = [name for _, name in alternatives]
        self.regex = re.compile("|".join(f"({_pattern(s)})" for s, _ in alternatives), re.IGNORECASE) \
            if alternatives else None

    def __call__(self, caption: str) -> List[str]:
        if self.regex is None:
            return []
        found: List[str] = []
        for m in self.regex.finditer(caption):
            name = self.names[m.lastindex - 1]
            if name not in found:
                found.append(name)
        return found


# ---------------------------------------------------------------------------------------------- mapper
class RandomResizedCrop(T.Augmentation):
    """A random crop of area fraction in `scale` and aspect ratio (log-uniform) in `ratio`, resized to `size`
    squared (torchvision's RandomResizedCrop rule: 10 tries, then the largest centred crop in the ratio range)."""

    def __init__(self, size: int, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3)):
        super().__init__()
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)

    def _box(self, h: int, w: int) -> Tuple[int, int, int, int]:
        area = h * w
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * random.uniform(*self.scale)
            aspect = math.exp(random.uniform(*log_ratio))
            cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                return random.randint(0, h - ch), random.randint(0, w - cw), ch, cw
        aspect = w / h
        if aspect < self.ratio[0]:
            cw, ch = w, int(round(w / self.ratio[0]))
        elif aspect > self.ratio[1]:
            ch, cw = h, int(round(h * self.ratio[1]))
        else:
            cw, ch = w, h
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    def get_transform(self, image: np.ndarray) -> T.Transform:
        h, w = image.shape[:2]
        y, x, ch, cw = self._box(h, w)
        return T.TransformList([T.CropTransform(x, y, cw, ch),
                                T.ResizeTransform(ch, cw, self.size, self.size)])


class ImageCaptionMapper:
    """Captioned image -> {"image": (3, S, S) uint8 tensor, "caption": one of its captions (drawn at random),
    "nouns": the noun vocabulary's entries named in that caption} (mapper "image_caption"). The model draws the
    multi-label prompts from "nouns"."""

    @configurable
    def __init__(self, *, augmentations: List[T.Augmentation], image_format: str = "RGB",
                 nouns: Optional[NounExtractor] = None):
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.nouns = nouns

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        c = cfg.INPUT.CAPTIONS
        augs: List[T.Augmentation] = [RandomResizedCrop(c.IMAGE_SIZE, tuple(c.CROP_SCALE))]
        if cfg.INPUT.RANDOM_FLIP != "none":
            augs.append(T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                                     vertical=cfg.INPUT.RANDOM_FLIP == "vertical"))
        nouns = NounExtractor(read_noun_vocabulary(c.NOUN_VOCABULARY)) if c.NOUN_VOCABULARY else None
        if nouns is None and cfg.MODEL.GROUPVIT.MULTI_LABEL > 0:
            logger.warning("INPUT.CAPTIONS.NOUN_VOCABULARY is empty: no nouns are found, so every multi-label prompt "
                           "is the caption itself (MODEL.GROUPVIT.MULTI_LABEL %d)", cfg.MODEL.GROUPVIT.MULTI_LABEL)
        return {"augmentations": augs, "image_format": cfg.INPUT.FORMAT, "nouns": nouns}

    def __call__(self, dataset_dict: Dict) -> Dict:
        d = copy.deepcopy(dataset_dict)
        if not d.get("captions"):
            raise ValueError(f"{d.get('file_name')!r}: the 'image_caption' mapper needs 'captions' (a captioned "
                             "dataset: captions:<json or folder>, or coco_2017_train_captions)")
        image = read_image(d["file_name"], format=self.image_format)
        aug = T.AugInput(image)
        self.augmentations(aug)
        d["image"] = image_to_tensor(aug.image)
        d["caption"] = random.choice(d.pop("captions"))
        d["nouns"] = self.nouns(d["caption"]) if self.nouns is not None else []
        return d


__all__ = ["CAPTION_DATASETS", "ImageCaptionMapper", "NounExtractor", "RandomResizedCrop", "load_caption_folder",
           "load_coco_captions", "read_noun_vocabulary", "register_caption_dataset", "register_caption_table"]
