"""Semantic segmentation metrics with the open-vocabulary split (classes seen / unseen in training)."""
from __future__ import annotations

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import SemSegEvaluator


def seen_unseen_miou(results: dict, seen: list, unseen: list) -> dict:
    """mIoU over the seen and the unseen classes and their harmonic mean, from SemSegEvaluator's `IoU-<name>`.

    Classes absent from the ground truth (IoU NaN) are skipped, as detectron2's mIoU skips them.
    """
    out = {}
    for key, names in (("mIoU-seen", seen), ("mIoU-unseen", unseen)):
        ious = [results[f"IoU-{n}"] for n in names if np.isfinite(results.get(f"IoU-{n}", np.nan))]
        out[key] = float(np.mean(ious)) if ious else float("nan")
    s, u = out["mIoU-seen"], out["mIoU-unseen"]
    out["hIoU"] = 2 * s * u / (s + u) if np.isfinite(s) and np.isfinite(u) and s + u > 0 else float("nan")
    return out


class OVSemSegEvaluator(SemSegEvaluator):
    """detectron2's SemSegEvaluator plus mIoU-seen / mIoU-unseen / hIoU when the dataset has both kinds of class."""

    def evaluate(self):
        results = super().evaluate()
        if not results:
            return results
        meta = MetadataCatalog.get(self._dataset_name)
        seen, unseen = meta.get("seen_classes", []), meta.get("unseen_classes", [])
        if seen and unseen:
            results["sem_seg"].update(seen_unseen_miou(results["sem_seg"], seen, unseen))
        return results
