#!/usr/bin/env python
"""ADE20K-847 (ADE20K full release, ADE20K_2021_17_01): 16-bit label maps of the 847 benchmark classes.

Input under $DETECTRON2_DATASETS/ADE20K_2021_17_01/ (see datasets/README.md):
  images/ADE/<split>/<scene folders>/ADE_<split>_*.jpg and *_seg.png
    (_seg.png: class = R / 10 * 256 + G, the object index of the full release; 0 = unlabelled)
Outputs next to it:
  images_detectron2/<split>/*.jpg           the images, flattened out of the scene folders
  annotations_detectron2/<split>/*.tif      uint16 contiguous ids 0..846, 65535 = not one of the 847 classes
"""
from __future__ import annotations

import functools
import os
from typing import Dict, Optional, Sequence

import numpy as np

from ovseg.data.class_table import load_class_table
from ovseg.data.prepare_utils import (
    PrepareError,
    base_parser,
    copy_file_atomic,
    read_image,
    require,
    resolve_root,
    run_cli,
    run_jobs,
    save_image_atomic,
)

IGNORE = 65535
HINT = ("download ADE20K_2021_17_01.zip (https://groups.csail.mit.edu/vision/datasets/ADE20K/) and extract it into "
        "$DETECTRON2_DATASETS")


def find_images(folder: str) -> Dict[str, str]:
    """{stem: image path} of the images that have a `_seg.png` beside them, searched recursively."""
    found = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".jpg") and f[:-4] + "_seg.png" in files:
                if f[:-4] in found:
                    raise PrepareError(f"image {f} appears twice: {found[f[:-4]]} and {os.path.join(dirpath, f)}")
                found[f[:-4]] = os.path.join(dirpath, f)
    if not found:
        raise PrepareError(f"no *.jpg with a matching *_seg.png under {folder}\n  {HINT}")
    return found


def convert_job(job, out_root: str, lut: np.ndarray) -> None:
    split, stem, image = job
    out_label = os.path.join(out_root, "annotations_detectron2", split, stem + ".tif")
    out_image = os.path.join(out_root, "images_detectron2", split, stem + ".jpg")
    if not os.path.exists(out_label):
        seg_path = image[:-4] + "_seg.png"
        seg = read_image(seg_path, "ADE20K full segmentation", channels=3).astype(np.int64)
        object_index = seg[..., 0] // 10 * 256 + seg[..., 1]
        if object_index.max() >= len(lut):
            raise PrepareError(f"malformed {seg_path}: object index {object_index.max()} beyond the full release")
        save_image_atomic(lut[object_index], out_label, fmt="TIFF")
    if not os.path.exists(out_image):
        copy_file_atomic(image, out_image)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--splits", nargs="+", default=["validation"], choices=["training", "validation"])
    args = parser.parse_args(argv)
    out_root = require(os.path.join(resolve_root(args.root), "ADE20K_2021_17_01"), "ADE20K full folder", HINT)
    table = load_class_table("ade20k_847")
    # object index (up to 256 * 25 + 255 given the R/10 encoding) -> contiguous id, 65535 elsewhere
    lut = np.full(256 * 26, IGNORE, dtype=np.uint16)
    for i, c in enumerate(table):
        lut[c.dataset_id] = i
    for split in args.splits:
        images = find_images(require(os.path.join(out_root, "images", "ADE", split), f"ADE20K full {split}", HINT))
        jobs = [(split, stem, images[stem]) for stem in sorted(images)]
        run_jobs(functools.partial(convert_job, out_root=out_root, lut=lut), jobs, args.workers,
                 f"ade20k-847 {split}")


if __name__ == "__main__":
    run_cli(main)
