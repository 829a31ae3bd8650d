#!/usr/bin/env python
"""COCO-Panoptic: semantic label maps (133 classes) derived from the panoptic PNGs.

Inputs under $DETECTRON2_DATASETS/coco/ (see datasets/README.md):
  {train,val}2017/*.jpg, annotations/panoptic_{train,val}2017.json, panoptic_{train,val}2017/*.png
    (panoptic_annotations_trainval2017.zip, with its inner panoptic_*2017.zip extracted)
Output:
  panoptic_semseg_{train,val}2017/*.png   uint8 contiguous ids 0..132 (class-list order), 255 = void
"""
from __future__ import annotations

import functools
import json
import os
from typing import Dict, Optional, Sequence

import numpy as np

from ovseg.data.class_table import load_class_table
from ovseg.data.image_io import rgb2id
from ovseg.data.prepare_utils import (
    PrepareError,
    base_parser,
    read_image,
    require,
    resolve_root,
    run_cli,
    run_jobs,
    save_image_atomic,
)

HINT = ("download panoptic_annotations_trainval2017.zip (https://cocodataset.org/#download) into "
        "$DETECTRON2_DATASETS/coco and extract annotations/panoptic_{train,val}2017.zip into coco/")


def convert_job(ann: dict, pan_dir: str, out_dir: str, id_map: Dict[int, int]) -> None:
    out = os.path.join(out_dir, ann["file_name"])
    if os.path.exists(out):
        return
    path = require(os.path.join(pan_dir, ann["file_name"]), "COCO panoptic PNG", HINT)
    segment_ids = rgb2id(read_image(path, "COCO panoptic PNG", channels=3))
    label = np.full(segment_ids.shape, 255, dtype=np.uint8)
    for seg in ann["segments_info"]:
        if seg["category_id"] not in id_map:
            raise PrepareError(f"malformed COCO panoptic annotation of {ann['file_name']}: category "
                               f"{seg['category_id']} is not one of the 133 panoptic categories")
        label[segment_ids == seg["id"]] = id_map[seg["category_id"]]  # crowd regions keep their class
    save_image_atomic(label, out)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    args = parser.parse_args(argv)
    coco = require(os.path.join(resolve_root(args.root), "coco"), "COCO folder", HINT)
    id_map = {c.dataset_id: i for i, c in enumerate(load_class_table("coco_panoptic_133"))}
    for split in args.splits:
        json_file = require(os.path.join(coco, "annotations", f"panoptic_{split}2017.json"), "panoptic JSON", HINT)
        pan_dir = require(os.path.join(coco, f"panoptic_{split}2017"), "panoptic PNG folder", HINT)
        try:
            with open(json_file, encoding="utf-8") as f:
                annotations = json.load(f)["annotations"]
        except (ValueError, KeyError) as e:
            raise PrepareError(f"malformed {json_file}: not a COCO panoptic JSON ({e!r})") from e
        fn = functools.partial(convert_job, pan_dir=pan_dir, out_dir=os.path.join(coco, f"panoptic_semseg_{split}2017"),
                               id_map=id_map)
        run_jobs(fn, annotations, args.workers, f"coco panoptic -> semantic {split}")


if __name__ == "__main__":
    run_cli(main)
