#!/usr/bin/env python
"""COCO-Stuff-164k: the 182-id stuff+thing maps relabelled to the 171 used classes.

Input under $DETECTRON2_DATASETS/coco/ (see datasets/README.md):
  {train,val}2017/*.jpg, stuffthingmaps_trainval2017/{train2017,val2017}/*.png   (stuffthingmaps_trainval2017.zip:
  value = COCO category id - 1, 255 = unlabelled)
Output:
  stuffthingmaps_detectron2/{train2017,val2017}/*.png   uint8 contiguous ids 0..170 (class-list order), 255 = ignore
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import numpy as np

from ovseg.data.class_table import load_class_table
from ovseg.data.prepare_utils import (
    base_parser,
    list_files,
    read_image,
    require,
    resolve_root,
    run_cli,
    run_jobs,
    save_image_atomic,
)

HINT = ("download stuffthingmaps_trainval2017.zip (https://github.com/nightrome/cocostuff) and extract it into "
        "$DETECTRON2_DATASETS/coco/stuffthingmaps_trainval2017")


def convert_job(name: str, src_dir: str, out_dir: str, lut: np.ndarray) -> None:
    out = os.path.join(out_dir, name)
    if os.path.exists(out):
        return
    path = os.path.join(src_dir, name)
    save_image_atomic(lut[read_image(path, "COCO-Stuff label map", channels=1, modes=("L", "P"))], out)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    args = parser.parse_args(argv)
    coco = require(os.path.join(resolve_root(args.root), "coco"), "COCO folder", HINT)
    # value (= id - 1) -> contiguous id; the 11 ids COCO never used and 255 map to ignore
    lut = np.full(256, 255, dtype=np.uint8)
    for i, c in enumerate(load_class_table("coco_stuff_171")):
        lut[c.dataset_id - 1] = i
    for split in args.splits:
        src_dir = os.path.join(coco, "stuffthingmaps_trainval2017", f"{split}2017")
        names = list_files(src_dir, ".png", f"COCO-Stuff {split} label maps", HINT)
        fn = functools.partial(convert_job, src_dir=src_dir,
                               out_dir=os.path.join(coco, "stuffthingmaps_detectron2", f"{split}2017"), lut=lut)
        run_jobs(fn, names, args.workers, f"coco-stuff {split}")


if __name__ == "__main__":
    run_cli(main)
