#!/usr/bin/env python
"""COCO-Object (val2017), as SCLIP / ClearCLIP / NACLIP evaluate it: background + the 80 COCO thing classes.

Inputs under $DETECTRON2_DATASETS/coco/ (see datasets/README.md):
  val2017/*.jpg, annotations/instances_val2017.json   (val2017.zip, annotations_trainval2017.zip)
Output:
  coco_object_detectron2/val2017/*.png   uint8, one per image of the JSON: 0 = background (no instance),
                                         1..80 = the thing classes in COCO category-id order (class-list order)
Instances are painted in the JSON's annotation order, a later one overwriting an earlier one where they overlap
(as cocostuffapi's `cocoSegmentationToSegmentationMap` rasterises COCO annotations); crowd regions (`iscrowd` 1)
are painted with their class like any instance, as in the COCO-Stuff thing maps the authors convert. No pixel is
ignored: the authors' maps ignore COCO-Stuff's unlabelled pixels, which the instance JSON cannot tell from
background, so they are background here.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util

from ovseg.data.datasets import benchmark_classes
from ovseg.data.prepare_utils import (
    PrepareError,
    base_parser,
    require,
    resolve_root,
    run_cli,
    run_jobs,
    save_image_atomic,
)

HINT = ("download val2017.zip and annotations_trainval2017.zip (https://cocodataset.org/#download) and extract "
        "them into $DETECTRON2_DATASETS/coco")
BENCHMARK = "coco_object_sem_seg_val"

# (image file name, height, width, [(annotation id, category id, segmentation), ...] in JSON order)
Job = Tuple[str, int, int, List[Tuple[int, int, object]]]


def category_to_label() -> Dict[int, int]:
    """COCO category id -> label value: the benchmark's classes after background (0), i.e. the things in order."""
    return {c.dataset_id: i for i, c in enumerate(benchmark_classes(BENCHMARK)) if i > 0}


def decode_segmentation(segm, height: int, width: int) -> np.ndarray:
    """An instance's `segmentation` (polygons, uncompressed or compressed RLE) as a (height, width) 0/1 mask,
    decoded as pycocotools' COCO.annToMask does."""
    if isinstance(segm, list):  # polygons: one RLE per part, merged
        rle = mask_util.merge(mask_util.frPyObjects(segm, height, width))
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):  # uncompressed RLE (crowd regions)
        rle = mask_util.frPyObjects(segm, height, width)
    else:
        rle = segm
    return mask_util.decode(rle)


def convert_job(job: Job, out_dir: str, label_of: Dict[int, int]) -> None:
    file_name, height, width, anns = job
    out = os.path.join(out_dir, os.path.splitext(file_name)[0] + ".png")
    if os.path.exists(out):
        return
    label = np.zeros((height, width), dtype=np.uint8)
    for ann_id, category_id, segm in anns:
        if category_id not in label_of:
            raise PrepareError(f"malformed COCO instance annotation {ann_id} of {file_name}: category {category_id} "
                               "is not one of the 80 COCO thing categories")
        try:
            mask = decode_segmentation(segm, height, width)
        except Exception as e:
            raise PrepareError(f"malformed COCO instance annotation {ann_id} of {file_name}: segmentation cannot "
                               f"be decoded ({e})") from e
        if mask.shape != label.shape:
            raise PrepareError(f"malformed COCO instance annotation {ann_id} of {file_name}: mask {mask.shape}, "
                               f"image {label.shape}")
        label[mask > 0] = label_of[category_id]  # later annotations win; crowd regions keep their class
    save_image_atomic(label, out)


def read_jobs(json_file: str) -> List[Job]:
    """One job per image of the instance JSON (images without instances included: all background)."""
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
        anns: Dict[int, list] = {img["id"]: [] for img in data["images"]}
        for ann in data["annotations"]:
            anns[ann["image_id"]].append((ann["id"], ann["category_id"], ann["segmentation"]))
        return [(img["file_name"], int(img["height"]), int(img["width"]), anns[img["id"]]) for img in data["images"]]
    except (ValueError, KeyError, TypeError) as e:
        raise PrepareError(f"malformed {json_file}: not a COCO instance JSON ({e!r})") from e


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = base_parser(__doc__)
    args = parser.parse_args(argv)
    coco = require(os.path.join(resolve_root(args.root), "coco"), "COCO folder", HINT)
    json_file = require(os.path.join(coco, "annotations", "instances_val2017.json"), "COCO instance JSON", HINT)
    image_dir = require(os.path.join(coco, "val2017"), "COCO val2017 image folder", HINT)
    jobs = read_jobs(json_file)
    if not jobs:
        raise PrepareError(f"malformed {json_file}: no images")
    require(os.path.join(image_dir, jobs[0][0]), "COCO val2017 image", HINT)  # cheap early check
    fn = functools.partial(convert_job, out_dir=os.path.join(coco, "coco_object_detectron2", "val2017"),
                           label_of=category_to_label())
    run_jobs(fn, jobs, args.workers, "coco-object")


if __name__ == "__main__":
    run_cli(main)
