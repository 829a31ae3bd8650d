"""The evaluators of a registered benchmark, chosen from its metadata's `evaluator_type`."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators

from ..data.datasets import INSTANCE, PANOPTIC_TYPES, SEM_SEG
from .panoptic_quality import OVSegPanopticEvaluator
from .region_recognition import RegionRecognitionEvaluator
from .sem_seg import OVSemSegEvaluator

ALL_TASKS = ("sem_seg", "panoptic_seg", "instances")


def build_benchmark_evaluator(
    dataset_name: str,
    output_dir: Optional[str] = None,
    tasks: Optional[Iterable[str]] = None,
    distributed: bool = True,
    seen: Optional[Sequence[bool]] = None,
) -> DatasetEvaluators:
    """Evaluators for `dataset_name`, restricted to the output keys the model produces.

    Args:
        dataset_name: a registered dataset (its metadata's `evaluator_type` decides).
        output_dir: where evaluators write their predictions/results.
        tasks: subset of ("sem_seg", "panoptic_seg", "instances") the model outputs; default all three.
            "region_recognition" (panoptic benchmarks only) is evaluated only when listed.
            A semantic-only model evaluated on a panoptic benchmark gets its semantic metrics only.
        distributed: gather results over processes.
        seen: per class of the dataset, whether the model was trained on it (`OpenVocabModel.seen_for_dataset`):
            the mIoU-seen / unseen split; None = the dataset's reference split (`OVSemSegEvaluator`).
    Returns:
        DatasetEvaluators; ValueError when none applies.
    """
    tasks = set(ALL_TASKS if tasks is None else tasks)
    meta = MetadataCatalog.get(dataset_name)
    kind = meta.get("evaluator_type", None)
    evaluators = []
    if "sem_seg" in tasks and (kind == SEM_SEG or (kind in PANOPTIC_TYPES and meta.get("sem_seg_root", None))):
        evaluators.append(OVSemSegEvaluator(dataset_name, distributed=distributed, output_dir=output_dir,
                                            seen=seen))
    if "panoptic_seg" in tasks and kind in PANOPTIC_TYPES:
        evaluators.append(OVSegPanopticEvaluator(dataset_name, output_dir=output_dir))
    if "instances" in tasks and (kind == INSTANCE or (kind in PANOPTIC_TYPES and meta.get("json_file", None))):
        evaluators.append(
            COCOEvaluator(dataset_name, tasks=("segm",), distributed=distributed, output_dir=output_dir)
        )
    if "region_recognition" in tasks and kind in PANOPTIC_TYPES:
        # never among the defaults: only models that pool given regions (CLIPSelfDistiller) ask for it
        evaluators.append(RegionRecognitionEvaluator(dataset_name, distributed=distributed, output_dir=output_dir))
    if not evaluators:
        raise ValueError(
            f"no evaluator for dataset {dataset_name!r} (evaluator_type={kind!r}) and model outputs {sorted(tasks)}"
        )
    return DatasetEvaluators(evaluators)
