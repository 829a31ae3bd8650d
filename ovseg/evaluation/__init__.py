"""Benchmark evaluators: semantic (with seen/unseen split), panoptic quality with either backend, instance AP."""
from .build import build_benchmark_evaluator
from .panoptic_quality import OVSegPanopticEvaluator, format_pq_table, panoptic_backend, pq_compute
from .sem_seg import OVSemSegEvaluator, load_sem_seg_gt, seen_unseen_miou

__all__ = [
    "OVSegPanopticEvaluator",
    "OVSemSegEvaluator",
    "build_benchmark_evaluator",
    "format_pq_table",
    "load_sem_seg_gt",
    "panoptic_backend",
    "pq_compute",
    "seen_unseen_miou",
]
