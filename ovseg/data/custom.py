"""Your own data, named in DATASETS.TRAIN / DATASETS.TEST with no code (layouts: datasets/README.md).

    folder:<dir>        <dir>/classes.txt (line i = class i, synonyms joined by '|'), <dir>/images/, <dir>/labels/
                        (PNG label maps, value i = class i, 255 = ignore, same relative path and stem as the image)
    coco:<json>         a COCO instances JSON (every class a thing) or COCO panoptic JSON (things and stuff from its
                        `isthing`), images under <json folder>/images/, panoptic PNGs in <json folder>/<json stem>/
    custom:<yaml>       a description naming the same parts explicitly (see `DESCRIPTION_KEYS`)
    captions:<json|dir> captioned images for image-text training (`ovseg.data.captions`)

`register_dataset_names` registers the names of these forms found in a list (plain image folders too, as
`register_image_folders` does), like the benchmark table: metadata now, files read when the dataset is loaded.
Malformed data (no class file, a label map without its image, label values beyond the classes) is one clear error.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
import yaml
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json
from PIL import Image

from .captions import PREFIX as CAPTIONS_PREFIX
from .captions import register_caption_dataset
from .class_table import _fallback_colors
from .clipself_mapper import register_image_folders
from .datasets import COCO_PANOPTIC, INSTANCE, SEM_SEG, files_under, missing_record_files
from .image_io import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

PREFIXES = ("folder:", "coco:", "custom:")
# keys of a `custom:` description; paths relative to the description's folder
DESCRIPTION_KEYS = ("format", "classes", "images", "labels", "json", "panoptic_dir", "ignore_label")


@dataclass(frozen=True)
class CustomDataset:
    """One user dataset; every path absolute."""

    name: str
    format: str  # "folder" (semantic label maps) or "coco" (instances or panoptic JSON)
    images: str
    classes: str = ""  # folder: class-name file
    labels: str = ""  # folder: label maps
    json: str = ""  # coco: the JSON
    panoptic_dir: str = ""  # coco panoptic: the PNG folder
    ignore_label: int = 255


def _problem(name: str, message: str) -> ValueError:
    return ValueError(f"dataset {name!r}: {message} (layouts: datasets/README.md, 'Your own data')")


def parse_dataset_name(name: str) -> CustomDataset:
    """`folder:<dir>`, `coco:<json>` or `custom:<yaml>` -> its description (nothing but the yaml is read)."""
    kind, _, path = name.partition(":")
    if kind not in ("folder", "coco", "custom") or not path:
        raise _problem(name, f"not of the forms {', '.join(p + '<path>' for p in PREFIXES)}")
    path = os.path.abspath(os.path.expanduser(path))
    if kind == "folder":
        return CustomDataset(name, "folder", images=os.path.join(path, "images"),
                             classes=os.path.join(path, "classes.txt"), labels=os.path.join(path, "labels"))
    if kind == "coco":
        folder, stem = os.path.split(os.path.splitext(path)[0])
        return CustomDataset(name, "coco", images=os.path.join(folder, "images"), json=path,
                             panoptic_dir=os.path.join(folder, stem))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset {name!r}: no description file {path!r}")
    with open(path, encoding="utf-8") as f:
        desc = yaml.safe_load(f) or {}
    unknown = sorted(set(desc) - set(DESCRIPTION_KEYS)) if isinstance(desc, dict) else ["(not a mapping)"]
    if unknown or desc.get("format") not in ("folder", "coco") or not desc.get("images"):
        raise _problem(name, f"{path!r} needs `format: folder|coco` and `images`, and only the keys "
                             f"{list(DESCRIPTION_KEYS)} (unknown: {unknown})")
    base = os.path.dirname(path)
    paths = {k: os.path.join(base, os.path.expanduser(str(desc[k])))
             for k in ("classes", "images", "labels", "json", "panoptic_dir") if desc.get(k)}
    return CustomDataset(name, desc["format"], ignore_label=int(desc.get("ignore_label", 255)), **paths)


# ---------------------------------------------------------------------------------------------- folder
def read_class_file(path: str, name: str) -> List[str]:
    """Vocabulary entries of a class-name file: one class per non-blank line (synonyms joined by '|'), '#' comments."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset {name!r}: no class-name file {path!r} (one class per line, line i = "
                                "label value i; see datasets/README.md, 'Your own data')")
    with open(path, encoding="utf-8") as f:
        entries = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    if not entries:
        raise _problem(name, f"class-name file {path!r} lists no class")
    return entries


def _image_for(ds: CustomDataset, label_rel: str) -> str:
    stem = os.path.splitext(label_rel)[0]
    for suffix in IMAGE_SUFFIXES:
        for candidate in (stem + suffix, stem + suffix.upper()):
            if os.path.isfile(os.path.join(ds.images, candidate)):
                return os.path.join(ds.images, candidate)
    raise _problem(ds.name, f"label map {os.path.join(ds.labels, label_rel)!r} has no image {stem}.* "
                            f"({', '.join(IMAGE_SUFFIXES)}) in {ds.images!r}")


def load_folder(ds: CustomDataset) -> List[dict]:
    """One record per label map, paired with the image of the same stem; every label value is checked to be a
    class index or the ignore label."""
    num_classes = len(read_class_file(ds.classes, ds.name))
    for folder, what in ((ds.images, "image folder"), (ds.labels, "label folder")):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"dataset {ds.name!r}: no {what} {folder!r}")
    labels = files_under(ds.labels, ".png")
    if not labels:
        raise _problem(ds.name, f"no PNG label maps in {ds.labels!r}")
    records = []
    for rel in labels:
        path = os.path.join(ds.labels, rel)
        image = _image_for(ds, rel)
        values = np.unique(np.asarray(Image.open(path)))
        bad = values[(values >= num_classes) & (values != ds.ignore_label)]
        if len(bad):
            raise _problem(ds.name, f"label map {path!r} has values {bad[:10].tolist()} beyond the "
                                    f"{num_classes} classes of {ds.classes!r} (ignore label {ds.ignore_label})")
        records.append({"file_name": image, "sem_seg_file_name": path, "image_id": os.path.splitext(rel)[0]})
    logger.info("Loaded %d labelled images of %s", len(records), ds.name)
    return records


# ---------------------------------------------------------------------------------------------- coco
def _read_json(ds: CustomDataset) -> dict:
    if not os.path.isfile(ds.json):
        raise FileNotFoundError(f"dataset {ds.name!r}: no COCO JSON {ds.json!r}")
    with open(ds.json, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not data.get("categories") or "annotations" not in data:
        raise _problem(ds.name, f"{ds.json!r} is not a COCO JSON: it needs 'categories' and 'annotations'")
    return data


def _is_panoptic(data: dict) -> bool:
    return any("segments_info" in a for a in data["annotations"])


def load_coco_panoptic(ds: CustomDataset) -> List[dict]:
    """COCO panoptic JSON + PNGs as detectron2 panoptic records (category ids made contiguous)."""
    data = _read_json(ds)
    meta = MetadataCatalog.get(ds.name)
    things, all_ids = meta.thing_dataset_id_to_contiguous_id, meta.stuff_dataset_id_to_contiguous_id
    images = {im["id"]: im for im in data.get("images", [])}
    records = []
    for ann in data["annotations"]:
        if ann["image_id"] not in images:
            raise _problem(ds.name, f"annotation {ann['file_name']!r} names image id {ann['image_id']}, which is "
                                    f"not in the JSON's 'images'")
        segments = []
        for seg in ann["segments_info"]:
            if seg["category_id"] not in all_ids:
                raise _problem(ds.name, f"segment {seg['id']} of {ann['file_name']!r} has category "
                                        f"{seg['category_id']}, not one of the JSON's categories")
            segments.append({**seg, "category_id": all_ids[seg["category_id"]],
                             "isthing": seg["category_id"] in things})
        image = images[ann["image_id"]]
        records.append({"file_name": os.path.join(ds.images, image["file_name"]), "image_id": ann["image_id"],
                        "height": image.get("height"), "width": image.get("width"),
                        "pan_seg_file_name": os.path.join(ds.panoptic_dir, ann["file_name"]),
                        "segments_info": segments})
    _check_files(ds, records, ("file_name", "pan_seg_file_name"))
    return records


def load_coco_instances(ds: CustomDataset) -> List[dict]:
    """COCO instances JSON as detectron2 records, category ids made contiguous."""
    _read_json(ds)  # the clear error for a wrong file, before detectron2's loader
    id_map = MetadataCatalog.get(ds.name).thing_dataset_id_to_contiguous_id
    records = load_coco_json(ds.json, ds.images)  # no dataset name: leaves the metadata to us
    for record in records:
        for obj in record.get("annotations", []):
            obj["category_id"] = id_map[obj["category_id"]]
    _check_files(ds, records, ("file_name",))
    return records


def _check_files(ds: CustomDataset, records: List[dict], keys: Sequence[str]) -> None:
    if not records:
        raise _problem(ds.name, f"{ds.json!r} has no annotated image")
    missing = missing_record_files(records, keys)
    if missing:
        key, path = missing[0]
        raise FileNotFoundError(f"dataset {ds.name!r}: {len(missing)} file(s) listed in {ds.json!r} are missing, "
                                f"e.g. {key} {path!r}")


def _coco_categories(ds: CustomDataset, data: dict) -> List[dict]:
    cats = data["categories"]
    ids = [c["id"] for c in cats]
    if len(set(ids)) != len(ids):
        raise _problem(ds.name, f"{ds.json!r} has duplicate category ids")
    return cats


# ---------------------------------------------------------------------------------------------- metadata
def custom_metadata(ds: CustomDataset) -> Dict:
    """What `MetadataCatalog.get(name)` holds for a user dataset (class names read, images not)."""
    if ds.format == "folder":
        vocabulary = read_class_file(ds.classes, ds.name)
        names = [v.split("|")[0].strip() for v in vocabulary]
        return {"evaluator_type": SEM_SEG, "ignore_label": ds.ignore_label, "image_root": ds.images,
                "sem_seg_root": ds.labels, "class_list": ds.classes, "vocabulary": vocabulary,
                "stuff_classes": names, "stuff_colors": _fallback_colors(len(names)).tolist()}
    data = _read_json(ds)
    cats = _coco_categories(ds, data)
    names = [c["name"] for c in cats]
    colors = [list(c["color"]) if c.get("color") else rgb for c, rgb in zip(cats, _fallback_colors(len(cats)).tolist())]
    meta = {"image_root": ds.images, "json_file": ds.json, "ignore_label": ds.ignore_label}
    if not _is_panoptic(data):  # instances: every category is a thing
        return {**meta, "evaluator_type": INSTANCE, "vocabulary": names, "thing_classes": names,
                "thing_colors": colors, "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(cats)}}
    things = [(i, c) for i, c in enumerate(cats) if c.get("isthing", 1)]
    del meta["json_file"]  # a panoptic JSON is not an instances JSON for COCOEvaluator
    return {**meta, "evaluator_type": COCO_PANOPTIC, "vocabulary": names, "stuff_classes": names,
            "stuff_colors": colors, "thing_classes": [c["name"] for _, c in things],
            "thing_colors": [colors[i] for i, _ in things],
            "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in things},
            "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(cats)},
            "panoptic_root": ds.panoptic_dir, "panoptic_json": ds.json, "label_divisor": 1000}


def _loader(ds: CustomDataset, evaluator_type: str):
    if ds.format == "folder":
        return lambda: load_folder(ds)
    if evaluator_type == COCO_PANOPTIC:
        return lambda: load_coco_panoptic(ds)
    return lambda: load_coco_instances(ds)


def register_custom_dataset(name: str) -> CustomDataset:
    """Register one `folder:` / `coco:` / `custom:` name (again, replacing an earlier registration)."""
    ds = parse_dataset_name(name)
    meta = custom_metadata(ds)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(**meta)
    DatasetCatalog.register(name, _loader(ds, meta["evaluator_type"]))
    logger.info("Registered %s (%s, %d classes)", name, meta["evaluator_type"], len(meta["vocabulary"]))
    return ds


def dataset_folder_name(name: str, max_len: int = 80) -> str:
    """A dataset name as one safe path component (e.g. the evaluator's output folder): a benchmark name stays as it
    is; `folder:/abs/path/` and the like become letters, digits and `._-` plus a hash of the full name, so that two
    names differing only in the replaced characters keep distinct folders."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip(".")  # no "." or ".." component
    if safe == name and len(name) <= max_len:
        return name
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
    return f"{safe[:max_len] or 'dataset'}_{digest}"


def register_dataset_names(names: Sequence[str]) -> None:
    """Register every user dataset among `names` (DATASETS.TRAIN + DATASETS.TEST) not registered yet: the
    `folder:` / `coco:` / `custom:` forms, and plain image folders (`register_image_folders`). Other names are
    left to the catalogs (the benchmark table, the user's own registrations)."""
    names = [n for n in names if n not in DatasetCatalog.list()]
    for name in names:
        if name.startswith(PREFIXES):
            register_custom_dataset(name)
        elif name.startswith(CAPTIONS_PREFIX):
            register_caption_dataset(name)
    register_image_folders([n for n in names if not n.startswith(PREFIXES + (CAPTIONS_PREFIX,))])


__all__ = ["CustomDataset", "dataset_folder_name", "parse_dataset_name", "register_custom_dataset",
           "register_dataset_names"]
