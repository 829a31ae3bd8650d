"""Semantic segmentation metrics with the open-vocabulary split (classes seen / unseen in training)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import SemSegEvaluator
from detectron2.utils.file_io import PathManager
from PIL import Image

from ..data.image_io import check_label_shape


class _LabelMap:
    """An (H, W) label map (MODEL.SEM_SEG_OUTPUT "labels") where detectron2's `SemSegEvaluator.process` expects
    (C, H, W) scores, of which it reads only the argmax over classes."""

    def __init__(self, labels):
        self.labels = labels

    def argmax(self, dim: int):
        if dim != 0:
            raise ValueError(f"a label map is the argmax over dim 0 of the scores, not over dim {dim}")
        return self.labels


def load_sem_seg_gt(filename: str, dtype: Optional[Union[np.dtype, str, type]] = None) -> np.ndarray:
    """A ground-truth label PNG as a fresh, writable (H, W) array of `dtype` (default: the PNG's own).

    Replaces detectron2's default `sem_seg_loading_fn`, whose `np.array(..., copy=False)` numpy 2 rejects
    whenever a copy is needed (always, for a dtype change); the evaluator writes into the array, so it is a copy.
    """
    with PathManager.open(filename, "rb") as f:
        return np.array(Image.open(f), dtype=dtype)


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
    """detectron2's SemSegEvaluator plus mIoU-seen / mIoU-unseen / hIoU, reading ground truth with
    `load_sem_seg_gt` (numpy 1 and 2).

    The split is the model's: `seen` gives, per class of the dataset, whether the model was trained on it (the
    engine passes `OpenVocabModel.seen_for_dataset`, the rule the model's own ensemble uses). Without it (a model
    that learned no class names, e.g. training-free) the dataset's reference split applies: its metadata's
    `seen_classes` / `unseen_classes` (the usual protocol's COCO-Panoptic training classes, `seen_class_mask`).
    """

    def __init__(self, dataset_name: str, distributed: bool = True, output_dir: Optional[str] = None, *,
                 sem_seg_loading_fn=load_sem_seg_gt, seen: Optional[Sequence[bool]] = None):
        super().__init__(dataset_name, distributed=distributed, output_dir=output_dir,
                         sem_seg_loading_fn=sem_seg_loading_fn)
        self.dataset_name = dataset_name
        self.class_names = list(MetadataCatalog.get(dataset_name).stuff_classes)
        self.seen = None if seen is None else [bool(s) for s in seen]
        if self.seen is not None and len(self.seen) != len(self.class_names):
            raise ValueError(f"seen has {len(self.seen)} entries for the {len(self.class_names)} classes of "
                             f"{dataset_name!r}")

    def seen_unseen_classes(self) -> Tuple[List[str], List[str]]:
        """The dataset's class names split by `seen`, else by the metadata's reference split (empty lists when the
        metadata has none)."""
        if self.seen is None:
            meta = MetadataCatalog.get(self.dataset_name)
            return list(meta.get("seen_classes", [])), list(meta.get("unseen_classes", []))
        return ([n for n, s in zip(self.class_names, self.seen) if s],
                [n for n, s in zip(self.class_names, self.seen) if not s])

    def process(self, inputs, outputs):
        # a label map of another size than the prediction (i.e. its image) would fail in numpy without a file name,
        # or count wrong pixels when only the aspect differs: name both files instead (the PNG header is enough)
        for inp, out in zip(inputs, outputs):
            gt_file = self.input_file_to_gt_file[inp["file_name"]]
            with PathManager.open(gt_file, "rb") as f, Image.open(f) as label:
                width, height = label.size
            check_label_shape((height, width), out["sem_seg"].shape[-2:], gt_file, inp["file_name"])
        super().process(inputs, [{**o, "sem_seg": _LabelMap(o["sem_seg"])} if o["sem_seg"].dim() == 2 else o
                                 for o in outputs])

    def evaluate(self):
        results = super().evaluate()
        if not results:
            return results
        seen, unseen = self.seen_unseen_classes()
        if seen and unseen:
            results["sem_seg"].update(seen_unseen_miou(results["sem_seg"], seen, unseen))
        return results
