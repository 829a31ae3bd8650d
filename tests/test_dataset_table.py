"""The benchmark table: class lists, lazy registration, metadata, clear errors for missing data."""
import json
from unittest import mock

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser

from ovseg.config import get_ovseg_cfg
from ovseg.data import (
    BENCHMARKS_BY_NAME,
    class_list_path,
    load_class_table,
    register_all_ovseg_datasets,
    seen_class_mask,
)
from ovseg.modeling.text import parse_vocabulary


@pytest.mark.parametrize("table,n,things", [
    ("ade20k_150", 150, None), ("ade20k_847", 847, None), ("pascal_context_59", 59, None),
    ("pascal_context_459", 459, None), ("pascal_voc_21", 21, None), ("coco_panoptic_133", 133, 80),
    ("coco_stuff_171", 171, None), ("cityscapes_19", 19, 8),
])
def test_class_lists(table, n, things):
    classes = load_class_table(table)
    assert len(classes) == n
    names = [c.name.lower() for c in classes]
    assert len(set(names)) == n, "duplicate display names"
    if things is not None:
        assert sum(c.isthing for c in classes) == things
    # every list is a valid vocabulary in ovseg's format
    assert len(parse_vocabulary([c.vocabulary_entry for c in classes])) == n


def test_registration_is_lazy_and_errors_name_the_prepare_script(tmp_path):
    names = register_all_ovseg_datasets(str(tmp_path / "nowhere"))  # no disk access: the folder does not exist
    for name in ("ade20k_150_sem_seg_val", "ade20k_847_sem_seg_val", "pascal_context_59_sem_seg_val",
                 "pascal_context_459_sem_seg_val", "pascal_voc_20_sem_seg_val", "pascal_voc_21_sem_seg_val",
                 "coco_2017_val_panoptic_with_sem_seg", "coco_stuff_164k_sem_seg_val", "ade20k_150_panoptic_val",
                 "pascal_context_60_sem_seg_val", "coco_object_sem_seg_val", "cityscapes_19_sem_seg_val"):
        assert name in names and name in DatasetCatalog.list()
    with pytest.raises(FileNotFoundError, match=r"nowhere.*prepare_ade20k_150\.py"):
        DatasetCatalog.get("ade20k_150_sem_seg_val")
    for name, script in (("pascal_context_60_sem_seg_val", "prepare_pascal_context"),
                         ("coco_object_sem_seg_val", "prepare_coco_object"),
                         ("cityscapes_19_sem_seg_val", "prepare_cityscapes")):
        with pytest.raises(FileNotFoundError, match=rf"nowhere.*{script}\.py"):
            DatasetCatalog.get(name)
    register_all_ovseg_datasets()  # back to the default root for other tests


def test_train_net_reports_missing_data_before_building_the_model(tmp_path, monkeypatch):
    from ovseg import engine as train_net

    register_all_ovseg_datasets(str(tmp_path / "nowhere"))
    monkeypatch.setattr(train_net.Trainer, "build_model", mock.Mock(side_effect=AssertionError("model built")))
    try:
        for extra in (["--eval-only"], []):  # training checks its test sets too: they are evaluated at its end
            args = default_argument_parser().parse_args(
                ["--config-file", "configs/eval/pc60.yaml", *extra, "OUTPUT_DIR", str(tmp_path / "out")])
            with pytest.raises(FileNotFoundError, match=r"pascal_context_60_sem_seg_val.*nowhere.*pc60_val"):
                train_net.main(args)
        (tmp_path / "nowhere" / "VOCdevkit/VOC2010/annotations_detectron2/pc60_val").mkdir(parents=True)
        with pytest.raises(FileNotFoundError, match=r"image folder.*JPEGImages"):
            train_net.main(args)
    finally:
        register_all_ovseg_datasets()


def test_missing_data_check_needs_only_what_the_loader_reads(tmp_path):
    from ovseg.data.datasets import check_benchmark_files

    root = tmp_path / "root"
    register_all_ovseg_datasets(str(root))
    try:
        for sub in ("coco/val2017", "coco/panoptic_val2017", "coco/panoptic_semseg_val2017", "coco/annotations"):
            (root / sub).mkdir(parents=True)
        with pytest.raises(FileNotFoundError, match="panoptic JSON"):
            check_benchmark_files("coco_2017_val_panoptic_with_sem_seg")
        (root / "coco/annotations/panoptic_val2017.json").write_text("{}")
        # instances_val2017.json (instance AP when present) is not needed for panoptic + semantic
        check_benchmark_files("coco_2017_val_panoptic_with_sem_seg")
        check_benchmark_files("a_name_outside_the_table")  # e.g. CLIPSelf image folders: not checked
    finally:
        register_all_ovseg_datasets()


def test_metadata_for_open_vocabulary_evaluation():
    ade = MetadataCatalog.get("ade20k_150_sem_seg_val")
    assert len(ade.stuff_classes) == 150 and ade.ignore_label == 255 and ade.evaluator_type == "sem_seg"
    vocab = parse_vocabulary("ade20k_150_sem_seg_val")  # the test vocabulary the Trainer switches to
    assert vocab.names == ade.stuff_classes
    voc20, voc21 = (MetadataCatalog.get(f"pascal_voc_{n}_sem_seg_val") for n in (20, 21))
    assert len(voc20.stuff_classes) == 20 and voc21.stuff_classes[1:] == voc20.stuff_classes
    # seen classes are derived from the COCO training vocabulary: ADE's "person" is seen, most of ADE-847 not
    assert "person" in ade.seen_classes and set(ade.seen_classes).isdisjoint(ade.unseen_classes)
    coco = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    assert len(coco.thing_dataset_id_to_contiguous_id) == 80 and len(coco.stuff_dataset_id_to_contiguous_id) == 133
    assert all(seen_class_mask(coco.vocabulary))
    assert BENCHMARKS_BY_NAME["ade20k_847_sem_seg_val"].ignore_label == 65535


def test_benchmarks_with_a_background_class():
    """PC-60 and COCO-Object: class 0 is what the dense segmentor's background rule looks for, then the classes of
    PC-59 / COCO's 80 things in order; Cityscapes: the 19 trainIds of cityscapesScripts."""
    background = get_ovseg_cfg().MODEL.DENSE_SEG.BACKGROUND_CLASS
    pc60, pc59 = (MetadataCatalog.get(f"pascal_context_{n}_sem_seg_val") for n in (60, 59))
    assert pc60.stuff_classes == [background] + pc59.stuff_classes and pc60.stuff_colors[0] == [0, 0, 0]
    obj = MetadataCatalog.get("coco_object_sem_seg_val")
    things = [c.name for c in load_class_table("coco_panoptic_133") if c.isthing]
    assert obj.stuff_classes == [background] + things and len(things) == 80
    assert obj.vocabulary[1:] == [c.vocabulary_entry for c in load_class_table("coco_panoptic_133") if c.isthing]
    assert obj.unseen_classes == [background]  # the 80 things are COCO's training classes
    city = load_class_table("cityscapes_19")
    with open(class_list_path("cityscapes_19", "json")) as f:
        facts = json.load(f)
    assert [f["trainId"] for f in facts] == list(range(19))
    assert [c.dataset_id for c in city] == [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    assert MetadataCatalog.get("cityscapes_19_sem_seg_val").evaluator_type == "sem_seg"
