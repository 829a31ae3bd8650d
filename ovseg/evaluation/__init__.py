"""Benchmark evaluators: semantic (with seen/unseen split), panoptic quality with either backend, instance AP."""
from .build import build_benchmark_evaluator
from .panoptic_quality import OVSegPanopticEvaluator, id2rgb, panoptic_backend, pq_compute, rgb2id
from .sem_seg import OVSemSegEvaluator, seen_unseen_miou

__all__ = [
    "OVSegPanopticEvaluator",
    "OVSemSegEvaluator",
    "build_benchmark_evaluator",
    "id2rgb",
    "panoptic_backend",
    "pq_compute",
    "rgb2id",
    "seen_unseen_miou",
]
