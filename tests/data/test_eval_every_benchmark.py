"""Each prepared miniature benchmark through train_net's Trainer.test (what --eval-only runs) with the tiny
CLIPDenseSegmentor: the evaluator's mIoU equals a confusion matrix computed here from the model's own outputs."""
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.modeling import build_model
from PIL import Image

from ovseg import engine as train_net
from ovseg.data import register_all_ovseg_datasets
from tests.helpers import tiny_cfg

from .test_prepare_benchmarks import (
    make_ade_full,
    make_cityscapes,
    make_coco_object,
    make_coco_panoptic,
    make_pascal_context,
    make_voc,
    prepare_ade20k_847,
    prepare_cityscapes,
    prepare_coco_object,
    prepare_coco_panoptic,
    prepare_pascal_context,
    prepare_pascal_voc,
)


def _ade847(root):
    make_ade_full(root)
    prepare_ade20k_847.main(["--root", str(root), "--workers", "1"])
    return ["ade20k_847_sem_seg_val"]


def _pascal_context(root):
    _, ids_file, _ = make_pascal_context(root)
    prepare_pascal_context.main(["--root", str(root), "--val-ids", str(ids_file), "--workers", "1"])
    return ["pascal_context_59_sem_seg_val", "pascal_context_60_sem_seg_val", "pascal_context_459_sem_seg_val"]


def _voc(root):
    make_voc(root)
    prepare_pascal_voc.main(["--root", str(root), "--workers", "1"])
    return ["pascal_voc_20_sem_seg_val", "pascal_voc_21_sem_seg_val"]


def _coco_panoptic(root):
    make_coco_panoptic(root, n=2)
    prepare_coco_panoptic.main(["--root", str(root), "--splits", "val", "--workers", "1"])
    return ["coco_2017_val_panoptic_with_sem_seg"]


def _coco_object(root):
    make_coco_object(root)
    prepare_coco_object.main(["--root", str(root), "--workers", "1"])
    return ["coco_object_sem_seg_val"]


def _cityscapes(root):
    make_cityscapes(root)
    prepare_cityscapes.main(["--root", str(root), "--workers", "1"])
    return ["cityscapes_19_sem_seg_val"]


def _independent_miou(cfg, model, name):
    meta = MetadataCatalog.get(name)
    n, ignore = len(meta.stuff_classes), meta.ignore_label
    gt_files = {d["file_name"]: d["sem_seg_file_name"] for d in DatasetCatalog.get(name)}
    conf = np.zeros((n, n), np.int64)
    with torch.no_grad():
        for inputs in build_detection_test_loader(cfg, name):
            pred = model(inputs)[0]["sem_seg"].argmax(0).numpy()
            gt = np.array(Image.open(gt_files[inputs[0]["file_name"]])).astype(np.int64)
            valid = gt != ignore
            np.add.at(conf, (gt[valid], pred[valid]), 1)
    # detectron2's mIoU: the mean over the classes present in the ground truth
    union = conf.sum(0) + conf.sum(1) - np.diag(conf)
    present = conf.sum(1) > 0
    return 100 * np.mean(np.diag(conf)[present] / union[present])


# COCO-Object runs with the presets' background rule: the model must find the benchmark's `background` class
@pytest.mark.parametrize("prepare,opts", [
    (_ade847, {}), (_pascal_context, {}), (_voc, {}), (_coco_panoptic, {}),
    (_coco_object, {"MODEL__DENSE_SEG__BG_THRESHOLD": 0.5}), (_cityscapes, {}),
], ids=["ade847", "pascal_context", "voc", "coco_panoptic", "coco_object", "cityscapes"])
def test_trainer_test_on_prepared_benchmark(tmp_path, prepare, opts):
    names = prepare(tmp_path)
    register_all_ovseg_datasets(str(tmp_path))
    try:
        cfg = tiny_cfg(OUTPUT_DIR=str(tmp_path / "out"), MODEL__TEXT__TEMPLATES="single", INPUT__MIN_SIZE_TEST=24,
                       DATALOADER__NUM_WORKERS=0, **opts)
        cfg.DATASETS.TEST = tuple(names)
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        results = train_net.Trainer.test(cfg, model)
        for name in names:
            model.set_vocabulary(name)
            assert results[name]["sem_seg"]["mIoU"] == pytest.approx(_independent_miou(cfg, model, name), abs=1e-6)
    finally:
        register_all_ovseg_datasets()
