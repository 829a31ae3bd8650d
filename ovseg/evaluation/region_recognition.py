"""Region recognition: CLIPSelf's own measure of dense CLIP features.

Every ground-truth region of a panoptic dataset is classified from the dense features pooled over its box and over
its mask (the model does the pooling and the comparison with the class text embeddings: outputs
"box_region_scores" / "mask_region_scores", (K, C)). Reported: top-1 / top-5 accuracy averaged over classes (each
class present in the ground truth counts once), for all regions, things and stuff, for boxes and for masks.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Sequence

import detectron2.utils.comm as comm
import numpy as np
import torch
from detectron2.evaluation import DatasetEvaluator

logger = logging.getLogger(__name__)

POOLINGS = ("box", "mask")


def mean_class_accuracy(correct: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes in `labels` of the fraction of their regions that are `correct` (NaN if none)."""
    classes = np.unique(labels)
    if len(classes) == 0:
        return float("nan")
    return float(np.mean([correct[labels == c].mean() for c in classes]))


class RegionRecognitionEvaluator(DatasetEvaluator):
    """Mean per-class top-k accuracy of region classification.

    Reads from each input "region_classes" (K,) and "region_isthing" (K,), and from each output
    "box_region_scores" / "mask_region_scores" (K, C).
    """

    def __init__(self, dataset_name: str = "", distributed: bool = True, output_dir: str = None,
                 topk: Sequence[int] = (1, 5)):
        self.dataset_name = dataset_name
        self.distributed = distributed
        self.output_dir = output_dir
        self.topk = tuple(topk)
        self.reset()

    def reset(self):
        self._labels: List[np.ndarray] = []
        self._isthing: List[np.ndarray] = []
        self._ranks: Dict[str, List[np.ndarray]] = {p: [] for p in POOLINGS}

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            if "region_classes" not in inp:
                raise ValueError("region recognition needs 'region_classes' in the inputs: use "
                                 "INPUT.TEST_DATASET_MAPPER_NAME 'region_recognition'")
            labels = inp["region_classes"].cpu().numpy().astype(np.int64)
            self._labels.append(labels)
            self._isthing.append(inp["region_isthing"].cpu().numpy().astype(bool))
            for p in POOLINGS:
                scores = out[f"{p}_region_scores"].float().cpu()  # (K, C)
                if scores.shape[0] != len(labels):
                    raise ValueError(f"{p}_region_scores has {scores.shape[0]} rows for {len(labels)} regions")
                if len(labels) and labels.max() >= scores.shape[1]:
                    raise ValueError(f"class id {labels.max()} but only {scores.shape[1]} classes are scored: "
                                     "is the vocabulary the dataset's?")
                # rank of the true class = number of classes scored strictly higher
                true = scores.gather(1, torch.as_tensor(labels).view(-1, 1))
                self._ranks[p].append((scores > true).sum(1).numpy())

    def evaluate(self):
        labels, isthing, ranks = self._labels, self._isthing, self._ranks
        if self.distributed:
            comm.synchronize()
            labels = list(itertools.chain(*comm.gather(labels)))
            isthing = list(itertools.chain(*comm.gather(isthing)))
            ranks = {p: list(itertools.chain(*comm.gather(ranks[p]))) for p in POOLINGS}
            if not comm.is_main_process():
                return {}
        labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        isthing = np.concatenate(isthing) if isthing else np.zeros(0, bool)
        if len(labels) == 0:
            logger.warning("region recognition on %s: no regions to evaluate", self.dataset_name)
        res = OrderedDict()
        for p in POOLINGS:
            rank = np.concatenate(ranks[p]) if ranks[p] else np.zeros(0, np.int64)
            for k in self.topk:
                correct = rank < k
                res[f"{p}_top{k}"] = 100 * mean_class_accuracy(correct, labels)
                res[f"{p}_top{k}_thing"] = 100 * mean_class_accuracy(correct[isthing], labels[isthing])
                res[f"{p}_top{k}_stuff"] = 100 * mean_class_accuracy(correct[~isthing], labels[~isthing])
        res["num_regions"] = int(len(labels))
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "region_recognition.json"), "w") as f:
                json.dump(res, f, indent=1)
        return OrderedDict(region_recognition=res)
