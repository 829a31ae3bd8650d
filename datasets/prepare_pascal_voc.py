#!/usr/bin/env python
"""Pascal VOC 2012 (val) for VOC-21 (with background) and VOC-20 (background ignored).

Inputs under $DETECTRON2_DATASETS/VOCdevkit/VOC2012/ (VOCtrainval_11-May-2012.tar, see datasets/README.md):
  JPEGImages/*.jpg, SegmentationClass/*.png (palette: 0 = background, 1..20, 255 = boundary),
  ImageSets/Segmentation/val.txt
Outputs next to them:
  annotations_detectron2/voc21_val/*.png   0..20, 255 = ignore
  annotations_detectron2/voc20_val/*.png   0..19 (class k -> k - 1), background and boundary -> 255
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import numpy as np

from ovseg.data.prepare_utils import (
    base_parser,
    check_values,
    read_image,
    require,
    resolve_root,
    run_cli,
    run_jobs,
    save_image_atomic,
)

HINT = ("download VOCtrainval_11-May-2012.tar (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/) into "
        "$DETECTRON2_DATASETS")


def convert_job(image_id: str, voc: str) -> None:
    out21 = os.path.join(voc, "annotations_detectron2", "voc21_val", image_id + ".png")
    out20 = os.path.join(voc, "annotations_detectron2", "voc20_val", image_id + ".png")
    if os.path.exists(out21) and os.path.exists(out20):
        return
    path = require(os.path.join(voc, "SegmentationClass", image_id + ".png"), "VOC label map", HINT)
    label = read_image(path, "VOC label map", channels=1, modes=("P", "L"))  # palette indices, not colours
    check_values(label, 20, path, "VOC label map", extra=(255,))
    if not os.path.exists(out21):
        save_image_atomic(label.astype(np.uint8), out21)
    if not os.path.exists(out20):
        voc20 = np.where((label == 0) | (label == 255), 255, label.astype(np.int16) - 1)
        save_image_atomic(voc20.astype(np.uint8), out20)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = base_parser(__doc__)
    args = parser.parse_args(argv)
    voc = require(os.path.join(resolve_root(args.root), "VOCdevkit", "VOC2012"), "VOC2012 folder", HINT)
    with open(require(os.path.join(voc, "ImageSets", "Segmentation", "val.txt"), "VOC val list", HINT)) as f:
        ids = [ln.strip() for ln in f if ln.strip()]
    require(os.path.join(voc, "JPEGImages", ids[0] + ".jpg"), "VOC image", HINT)
    run_jobs(functools.partial(convert_job, voc=voc), ids, args.workers, "pascal voc")


if __name__ == "__main__":
    run_cli(main)
