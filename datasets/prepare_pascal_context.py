#!/usr/bin/env python
"""Pascal Context 59, 60 and 459 (val): label maps from the 459-class `trainval.tar.gz` .mat files.

Inputs under $DETECTRON2_DATASETS/VOCdevkit/VOC2010/ (see datasets/README.md):
  JPEGImages/*.jpg                                 (VOCtrainval_03-May-2010.tar)
  trainval/*.mat  with key `LabelMap`: 1..459 = line of labels.txt, 0 = unlabelled   (trainval.tar.gz)
The 5104 val image ids ship with ovseg (ovseg/data/class_lists/pascal_context_val_ids.txt).
Outputs next to them:
  annotations_detectron2/pc459_val/*.tif   uint16 0..458, 65535 = unlabelled
  annotations_detectron2/pc59_val/*.png    uint8 0..58, 255 = unlabelled or not one of the 59 frequent classes
  annotations_detectron2/pc60_val/*.png    uint8 0 = background (unlabelled or not one of the 59), 1..59 = the 59
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import numpy as np
import scipy.io

from ovseg.data.class_table import CLASS_LISTS_DIR, load_class_table, normalize_class_name
from ovseg.data.prepare_utils import (
    PrepareError,
    base_parser,
    check_values,
    require,
    resolve_root,
    run_cli,
    run_jobs,
    save_image_atomic,
)

VAL_IDS = os.path.join(CLASS_LISTS_DIR, "pascal_context_val_ids.txt")
HINT = ("download VOC2010 (VOCtrainval_03-May-2010.tar) and Pascal Context's trainval.tar.gz "
        "(https://cs.stanford.edu/~roozbeh/pascal-context/), extracting the latter into VOCdevkit/VOC2010")
# the 59-class list writes VOC's concatenated name where the 459 list has the plain word
NAME_IN_459 = {"diningtable": "table"}


def lut_459_to_59() -> np.ndarray:
    """.mat label (0..459) -> 59-class id, 255 elsewhere; classes matched by official name."""
    index_459 = {normalize_class_name(c.official_name): c.dataset_id for c in load_class_table("pascal_context_459")}
    lut = np.full(460, 255, dtype=np.uint8)
    for i, c in enumerate(load_class_table("pascal_context_59")):
        name = normalize_class_name(NAME_IN_459.get(c.official_name, c.official_name))
        lut[index_459[name] + 1] = i
    return lut


def lut_59_to_60(lut59: np.ndarray) -> np.ndarray:
    """PC-60 (SCLIP / mmseg's 60-class Pascal Context): background 0 for everything PC-59 ignores, class k -> k + 1."""
    return np.where(lut59 == 255, 0, lut59.astype(np.int64) + 1).astype(np.uint8)


def read_label_map(path: str) -> np.ndarray:
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:
        raise PrepareError(f"malformed Pascal Context annotation {path}: not a readable .mat file ({e})") from e
    if "LabelMap" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise PrepareError(f"malformed Pascal Context annotation {path}: no `LabelMap` (keys: {keys})")
    label = np.asarray(mat["LabelMap"])
    if label.ndim != 2 or label.dtype.kind not in "ui":
        raise PrepareError(f"malformed {path}: LabelMap is {label.dtype} {label.shape}, expected a 2-D integer map")
    check_values(label, 459, path, "Pascal Context LabelMap")
    return label.astype(np.int64)


def convert_job(image_id: str, voc: str, lut59: np.ndarray, lut60: np.ndarray) -> None:
    out_dir = os.path.join(voc, "annotations_detectron2")
    writers = [  # (output, label map from the .mat LabelMap 0..459, format)
        (os.path.join(out_dir, "pc459_val", image_id + ".tif"),
         lambda label: np.where(label == 0, 65535, label - 1).astype(np.uint16), "TIFF"),
        (os.path.join(out_dir, "pc59_val", image_id + ".png"), lambda label: lut59[label], "PNG"),
        (os.path.join(out_dir, "pc60_val", image_id + ".png"), lambda label: lut60[label], "PNG"),
    ]
    todo = [w for w in writers if not os.path.exists(w[0])]
    if not todo:
        return
    label = read_label_map(require(os.path.join(voc, "trainval", image_id + ".mat"), "Pascal Context .mat", HINT))
    for path, convert, fmt in todo:
        save_image_atomic(convert(label), path, fmt=fmt)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--val-ids", default=VAL_IDS, help="file with one VOC2010 image id per line")
    args = parser.parse_args(argv)
    voc = require(os.path.join(resolve_root(args.root), "VOCdevkit", "VOC2010"), "VOC2010 folder", HINT)
    require(os.path.join(voc, "trainval"), "Pascal Context .mat folder", HINT)
    with open(require(args.val_ids, "val id list"), encoding="utf-8") as f:
        ids = [ln.strip() for ln in f if ln.strip()]
    for image_id in (ids[0], ids[-1]):  # cheap early check that the images are where the dataset expects them
        require(os.path.join(voc, "JPEGImages", image_id + ".jpg"), "VOC2010 image", HINT)
    lut59 = lut_459_to_59()
    fn = functools.partial(convert_job, voc=voc, lut59=lut59, lut60=lut_59_to_60(lut59))
    run_jobs(fn, ids, args.workers, "pascal context")


if __name__ == "__main__":
    run_cli(main)
