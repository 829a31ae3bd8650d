"""Panoptic quality with whichever backend is installed, and a COCOPanopticEvaluator that does not need panopticapi.

panopticapi (github only, not on PyPI) is the reference implementation; hotcoco ships a drop-in `pq_compute` with
the same signature and result shape. Both give the same PQ on the same files (tests/data/test_panoptic_quality.py).
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import tempfile
from collections import OrderedDict
from typing import List, Optional

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOPanopticEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from PIL import Image

from ..data.image_io import id2rgb

logger = logging.getLogger(__name__)


def panoptic_backend() -> str:
    """"panopticapi" when importable, else "hotcoco"; ImportError when neither is installed."""
    try:
        import panopticapi.evaluation  # noqa: F401

        return "panopticapi"
    except ImportError:
        pass
    try:
        import hotcoco.panoptic  # noqa: F401

        return "hotcoco"
    except ImportError:
        raise ImportError(
            "panoptic evaluation needs panopticapi (pip install git+https://github.com/cocodataset/panopticapi.git) "
            "or hotcoco (pip install hotcoco)"
        ) from None


def pq_compute(
    gt_json_file: str,
    pred_json_file: str,
    gt_folder: Optional[str] = None,
    pred_folder: Optional[str] = None,
    backend: Optional[str] = None,
) -> dict:
    """PQ/SQ/RQ of COCO-panoptic predictions, as `panopticapi.evaluation.pq_compute` returns them.

    Args:
        gt_json_file, pred_json_file: COCO panoptic JSON files (the ground truth's `categories` are scored).
        gt_folder, pred_folder: their PNG folders (default: the JSON path without `.json`).
        backend: "panopticapi" or "hotcoco"; default `panoptic_backend()`.
    Returns:
        {"All"|"Things"|"Stuff": {"pq", "sq", "rq", "n"}, "per_class": {category_id: {"pq", "sq", "rq", ...}}},
        scores as fractions in [0, 1].
    """
    backend = backend or panoptic_backend()
    if backend == "panopticapi":
        from panopticapi.evaluation import pq_compute as _pq_compute
    elif backend == "hotcoco":
        from hotcoco.panoptic import pq_compute as _pq_compute
    else:
        raise ValueError(f"unknown panoptic backend {backend!r}; choose 'panopticapi' or 'hotcoco'")
    res = _pq_compute(gt_json_file, pred_json_file, gt_folder=gt_folder, pred_folder=pred_folder)
    # hotcoco reports -1 for a category absent from both sides; panopticapi reports 0 (both skip it in the means)
    for scores in res.get("per_class", {}).values():
        for key in ("pq", "sq", "rq"):
            if scores.get(key, 0.0) < 0:
                scores[key] = 0.0
    return res


def format_pq_table(pq_res: dict) -> str:
    """The All / Things / Stuff rows of a `pq_compute` result as a Markdown table: PQ, SQ, RQ in percent (3
    decimals) and the number of categories, the table detectron2's panoptic evaluator logs."""
    header = ["", "PQ", "SQ", "RQ", "#categories"]
    rows = [[name] + [f"{100 * pq_res[name][k]:.3f}" for k in ("pq", "sq", "rq")] + [str(pq_res[name]["n"])]
            for name in ("All", "Things", "Stuff")]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.center(w) for c, w in zip(r, widths)) + " |" for r in [header] + rows]
    lines.insert(1, "|" + "|".join(":" + "-" * w + ":" for w in widths) + "|")
    return "\n".join(lines)


class OVSegPanopticEvaluator(COCOPanopticEvaluator):
    """detectron2's COCOPanopticEvaluator, scoring through `pq_compute` (panopticapi or hotcoco).

    Same inputs, outputs and logged table as the parent; only the panopticapi imports are replaced. It keeps
    its own state (no use of the parent's private attributes) and stays a COCOPanopticEvaluator for callers
    that dispatch on the type.
    """

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None):
        super().__init__(dataset_name, output_dir=output_dir)
        self.metadata = MetadataCatalog.get(dataset_name)
        self.output_dir = output_dir
        # contiguous (model) ids -> dataset category ids, for things and for stuff
        self.thing_to_dataset = {v: k for k, v in self.metadata.thing_dataset_id_to_contiguous_id.items()}
        self.stuff_to_dataset = {v: k for k, v in self.metadata.stuff_dataset_id_to_contiguous_id.items()}
        self.predictions: List[dict] = []

    def reset(self):
        self.predictions = []

    def _dataset_category(self, segment: dict) -> dict:
        # a segment without "isthing" already carries the dataset's category id
        isthing = segment.pop("isthing", None)
        if isthing is not None:
            table = self.thing_to_dataset if isthing else self.stuff_to_dataset
            segment["category_id"] = table[segment["category_id"]]
        return segment

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            panoptic_img, segments_info = out["panoptic_seg"]
            panoptic_img = panoptic_img.cpu().numpy()
            if segments_info is None:
                panoptic_img, segments_info = self._segments_from_labels(panoptic_img)
            with io.BytesIO() as buf:
                Image.fromarray(id2rgb(panoptic_img)).save(buf, format="PNG")
                png = buf.getvalue()
            self.predictions.append(
                {
                    "image_id": inp["image_id"],
                    "file_name": os.path.splitext(os.path.basename(inp["file_name"]))[0] + ".png",
                    "png_string": png,
                    "segments_info": [self._dataset_category(dict(s)) for s in segments_info],
                }
            )

    def _segments_from_labels(self, panoptic_img: np.ndarray):
        # "category * label_divisor + instance" labels with -1 = void; the PNG format reserves 0 for void
        divisor = self.metadata.label_divisor
        thing_ids = set(self.metadata.thing_dataset_id_to_contiguous_id.values())
        segments = [
            {"id": int(label) + 1, "category_id": int(label) // divisor, "isthing": int(label) // divisor in thing_ids}
            for label in np.unique(panoptic_img)
            if label != -1
        ]
        return panoptic_img + 1, segments

    def evaluate(self):
        comm.synchronize()
        predictions = list(itertools.chain(*comm.gather(self.predictions)))
        if not comm.is_main_process():
            return None
        gt_json = PathManager.get_local_path(self.metadata.panoptic_json)
        gt_folder = PathManager.get_local_path(self.metadata.panoptic_root)
        backend = panoptic_backend()
        with tempfile.TemporaryDirectory(prefix="panoptic_eval") as pred_dir:
            for p in predictions:
                with open(os.path.join(pred_dir, p["file_name"]), "wb") as f:
                    f.write(p.pop("png_string"))
            with open(gt_json, encoding="utf-8") as f:
                json_data = json.load(f)
            json_data["annotations"] = predictions
            output_dir = self.output_dir or pred_dir
            predictions_json = os.path.join(output_dir, "predictions.json")
            with PathManager.open(predictions_json, "w") as f:
                f.write(json.dumps(json_data))
            logger.info("Computing panoptic quality with %s", backend)
            with contextlib.redirect_stdout(io.StringIO()):
                pq_res = pq_compute(gt_json, PathManager.get_local_path(predictions_json), gt_folder=gt_folder,
                                    pred_folder=pred_dir, backend=backend)
        res = {}
        for prefix, group in (("", "All"), ("_th", "Things"), ("_st", "Stuff")):
            for key in ("pq", "sq", "rq"):
                res[key.upper() + prefix] = 100 * pq_res[group][key]
        logger.info("Panoptic Evaluation Results:\n%s", format_pq_table(pq_res))
        return OrderedDict({"panoptic_seg": res})
