"""Benchmark registration (one table in `datasets.py`) and the class lists it reads.

Importing this package registers every benchmark under `$DETECTRON2_DATASETS` (default `datasets/`) without touching
the disk beyond the packaged class lists; call `register_all_ovseg_datasets(root)` to point them elsewhere.
"""
from .class_table import ClassEntry, class_list_path, load_class_table, normalize_class_name, seen_class_mask
from .datasets import BENCHMARKS, BENCHMARKS_BY_NAME, Benchmark, register_all_ovseg_datasets, register_benchmark

register_all_ovseg_datasets()

__all__ = [
    "BENCHMARKS",
    "BENCHMARKS_BY_NAME",
    "Benchmark",
    "ClassEntry",
    "class_list_path",
    "load_class_table",
    "normalize_class_name",
    "register_all_ovseg_datasets",
    "register_benchmark",
    "seen_class_mask",
]
