#!/usr/bin/env python
"""ADE20K-150 (ADEChallengeData2016): semantic label maps, and panoptic + instance annotations.

Inputs under $DETECTRON2_DATASETS/ADEChallengeData2016/ (see datasets/README.md):
  images/{training,validation}/*.jpg, annotations/{training,validation}/*.png   (ADEChallengeData2016.zip)
  annotations_instance/{training,validation}/*.png, categoryMapping.txt         (the instance/panoptic release)
Outputs next to them:
  annotations_detectron2/<split>/*.png     label - 1, "other" (0) -> 255
  ade20k_panoptic_<split>/*.png + ade20k_panoptic_<split>.json   category ids = class index 0..149
  ade20k_instance_<split>.json             things only, RLE masks, same image ids as the panoptic JSON
"""
from __future__ import annotations

import functools
import os
from typing import Dict, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util

from ovseg.data.class_table import load_class_table
from ovseg.data.image_io import id2rgb
from ovseg.data.prepare_utils import (
    PrepareError,
    base_parser,
    check_values,
    list_files,
    read_image,
    require,
    resolve_root,
    run_cli,
    run_jobs,
    save_image_atomic,
    save_json_atomic,
)

SPLITS = {"training": "train", "validation": "val"}
HINT = ("download ADEChallengeData2016.zip (http://sceneparsing.csail.mit.edu) and, for panoptic/instance, the "
        "instance annotations (annotations_instance/ + categoryMapping.txt) into $DETECTRON2_DATASETS/"
        "ADEChallengeData2016; or pass --tasks semantic")


def semantic_job(job, ade: str) -> None:
    split, name = job
    out = os.path.join(ade, "annotations_detectron2", split, name)
    if os.path.exists(out):
        return
    path = os.path.join(ade, "annotations", split, name)
    label = read_image(path, "ADE20K label map", channels=1, modes=("L", "P"))
    check_values(label, 150, path, "ADE20K label map")
    save_image_atomic((label.astype(np.int16) - 1).astype(np.uint8), out)  # 0 ("other") wraps to 255


def read_category_mapping(path: str) -> Dict[int, int]:
    """categoryMapping.txt: header, then `instance_id semantic_id name` (both 1-based) -> {instance id: class idx}."""
    mapping = {}
    with open(require(path, "ADE20K instance category mapping", HINT), encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if lineno == 1 or not fields:
                continue
            try:
                mapping[int(fields[0])] = int(fields[1]) - 1
            except (ValueError, IndexError):
                raise PrepareError(f"malformed {path} line {lineno}: expected `instance_id semantic_id name`, "
                                   f"got {line.strip()!r}") from None
    if not mapping:
        raise PrepareError(f"malformed {path}: no category lines")
    return mapping


def _bbox(mask: np.ndarray) -> list:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def panoptic_job(job, ade: str, mapping: Dict[int, int], isthing: Sequence[bool]):
    """One image -> (panoptic segments_info, instance annotations); writes the panoptic PNG unless present."""
    split, name, image_id = job
    sem_path = os.path.join(ade, "annotations", split, name)
    ins_path = os.path.join(ade, "annotations_instance", split, name)
    sem = read_image(sem_path, "ADE20K label map", channels=1, modes=("L", "P")).astype(np.int64) - 1
    ins = read_image(require(ins_path, "ADE20K instance annotation", HINT), "ADE20K instance annotation", channels=3)
    if ins.shape[:2] != sem.shape:
        raise PrepareError(f"malformed {ins_path}: size {ins.shape[:2]} differs from {sem_path} {sem.shape}")
    pan = np.zeros(sem.shape, dtype=np.int64)
    segments, instances = [], []
    # stuff from the semantic map, then things from the instance map pasted on top (the two may overlap)
    for cls in np.unique(sem):
        if cls < 0 or isthing[cls]:
            continue
        mask = sem == cls
        segments.append({"id": int(cls + 1) * 1000, "category_id": int(cls), "iscrowd": 0,
                         "area": int(mask.sum()), "bbox": _bbox(mask)})
        pan[mask] = segments[-1]["id"]
    cat_map, inst_map = ins[..., 0], ins[..., 1]  # R = instance-challenge category, G = instance index (0 = none)
    for k in np.unique(inst_map):
        if k == 0:
            continue
        mask = inst_map == k
        cats = np.unique(cat_map[mask])
        if len(cats) != 1 or int(cats[0]) not in mapping:
            raise PrepareError(f"malformed {ins_path}: instance {k} has category value(s) {cats.tolist()}, "
                               "expected one listed in categoryMapping.txt")
        cls = mapping[int(cats[0])]
        seg_id = (cls + 1) * 1000 + int(k)
        pan[mask] = seg_id
        segments.append({"id": seg_id, "category_id": cls, "iscrowd": 0, "area": int(mask.sum()),
                         "bbox": _bbox(mask)})
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        instances.append({"image_id": image_id, "category_id": cls, "iscrowd": 0, "segmentation": rle,
                          "area": int(mask.sum()), "bbox": _bbox(mask)})
    # a stuff segment partly covered by things keeps only its visible pixels
    visible = {s["id"]: int((pan == s["id"]).sum()) for s in segments}
    segments = [dict(s, area=visible[s["id"]], bbox=_bbox(pan == s["id"])) for s in segments if visible[s["id"]]]
    out = os.path.join(ade, f"ade20k_panoptic_{SPLITS[split]}", name)
    if not os.path.exists(out):
        save_image_atomic(id2rgb(pan), out)
    image = {"id": image_id, "file_name": os.path.splitext(name)[0] + ".jpg", "height": int(sem.shape[0]),
             "width": int(sem.shape[1])}
    annotation = {"image_id": image_id, "file_name": name, "segments_info": segments}
    return image, annotation, instances


def prepare_semantic(ade: str, split: str, workers: int) -> None:
    names = list_files(os.path.join(ade, "annotations", split), ".png", f"ADE20K {split} label maps", HINT)
    list_files(os.path.join(ade, "images", split), ".jpg", f"ADE20K {split} images", HINT)
    run_jobs(functools.partial(semantic_job, ade=ade), [(split, n) for n in names], workers, f"ade20k-150 {split}")


def prepare_panoptic(ade: str, split: str, workers: int) -> None:
    short = SPLITS[split]
    pan_json = os.path.join(ade, f"ade20k_panoptic_{short}.json")
    ins_json = os.path.join(ade, f"ade20k_instance_{short}.json")
    if os.path.exists(pan_json) and os.path.exists(ins_json):
        print(f"{pan_json} and {ins_json} exist, skipping")
        return
    table = load_class_table("ade20k_150")
    mapping = read_category_mapping(os.path.join(ade, "categoryMapping.txt"))
    names = list_files(os.path.join(ade, "annotations", split), ".png", f"ADE20K {split} label maps", HINT)
    list_files(os.path.join(ade, "annotations_instance", split), ".png", f"ADE20K {split} instance maps", HINT)
    jobs = [(split, n, i + 1) for i, n in enumerate(names)]  # integer image ids, shared by both JSON files
    fn = functools.partial(panoptic_job, ade=ade, mapping=mapping, isthing=[c.isthing for c in table])
    results = run_jobs(fn, jobs, workers, f"ade20k-150 panoptic {split}")
    images = [r[0] for r in results]
    categories = [{"id": i, "name": c.name, "isthing": int(c.isthing), "color": list(c.color)}
                  for i, c in enumerate(table)]
    instances = [dict(a, id=k + 1) for k, a in enumerate(a for r in results for a in r[2])]
    save_json_atomic({"images": images, "annotations": [r[1] for r in results], "categories": categories}, pan_json)
    save_json_atomic({"images": images, "annotations": instances,
                      "categories": [c for c in categories if c["isthing"]]}, ins_json)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--tasks", nargs="+", default=["semantic", "panoptic"], choices=["semantic", "panoptic"],
                        help="panoptic also writes the instance JSON")
    args = parser.parse_args(argv)
    ade = require(os.path.join(resolve_root(args.root), "ADEChallengeData2016"), "ADE20K folder", HINT)
    for split in args.splits:
        if "semantic" in args.tasks:
            prepare_semantic(ade, split, args.workers)
        if "panoptic" in args.tasks:
            prepare_panoptic(ade, split, args.workers)


if __name__ == "__main__":
    run_cli(main)
