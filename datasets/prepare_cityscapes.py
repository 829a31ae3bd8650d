#!/usr/bin/env python
"""Cityscapes (val) with the 19 evaluation classes: trainId label maps from the official labelId PNGs.

Inputs under $DETECTRON2_DATASETS/cityscapes/ (leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip; see
datasets/README.md):
  leftImg8bit/val/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  gtFine/val/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png     uint8 label ids 0..33 (cityscapesScripts' labels.py)
Output next to each of them, with the name and content cityscapesScripts' createTrainIdLabelImgs.py gives it (an
existing one is kept):
  gtFine/val/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png   uint8 trainIds 0..18 (class-list order),
                                                                    255 = every other label id (void, ignored)
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import numpy as np

from ovseg.data.class_table import load_class_table
from ovseg.data.prepare_utils import (
    base_parser,
    check_values,
    list_files,
    read_image,
    require,
    resolve_root,
    run_cli,
    run_jobs,
    save_image_atomic,
)

HINT = ("download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (https://www.cityscapes-dataset.com/) "
        "and extract both into $DETECTRON2_DATASETS/cityscapes")
LABEL_IDS = "_gtFine_labelIds.png"
TRAIN_IDS = "_gtFine_labelTrainIds.png"
MAX_LABEL_ID = 33  # labels.py: ids 0..33 (license plate, id -1, is never drawn into the PNGs)


def label_id_to_train_id() -> np.ndarray:
    """uint8 label id -> trainId: the 19 classes of `cityscapes_19` (table id = label id, order = trainId), 255 else."""
    lut = np.full(256, 255, dtype=np.uint8)
    for train_id, c in enumerate(load_class_table("cityscapes_19")):
        lut[c.dataset_id] = train_id
    return lut


def convert_job(rel_path: str, gt_dir: str, lut: np.ndarray) -> None:
    out = os.path.join(gt_dir, rel_path[: -len(LABEL_IDS)] + TRAIN_IDS)
    if os.path.exists(out):
        return
    path = os.path.join(gt_dir, rel_path)
    label = read_image(path, "Cityscapes labelIds map", channels=1, modes=("L", "P"))
    check_values(label, MAX_LABEL_ID, path, "Cityscapes labelIds map")
    save_image_atomic(lut[label], out)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = base_parser(__doc__)
    args = parser.parse_args(argv)
    cityscapes = require(os.path.join(resolve_root(args.root), "cityscapes"), "Cityscapes folder", HINT)
    gt_dir = os.path.join(cityscapes, "gtFine", "val")
    names = list_files(gt_dir, LABEL_IDS, "Cityscapes val labelIds maps", HINT, recursive=True)
    first = names[0][: -len(LABEL_IDS)] + "_leftImg8bit.png"  # cheap early check that the images are there too
    require(os.path.join(cityscapes, "leftImg8bit", "val", first), "Cityscapes image", HINT)
    run_jobs(functools.partial(convert_job, gt_dir=gt_dir, lut=label_id_to_train_id()), names, args.workers,
             "cityscapes")


if __name__ == "__main__":
    run_cli(main)
