"""Bad data on disk: missing label maps and listed files, labels of the wrong size, 16-bit greyscale images;
evaluation output folders for dataset names that are paths."""
import json
import os
import re

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data import transforms as T
from PIL import Image

from ovseg.data import BENCHMARKS_BY_NAME, load_class_table, register_all_ovseg_datasets
from ovseg.data.datasets import load_instances, load_panoptic, load_semantic
from ovseg.data.image_io import read_image
from ovseg.data.mappers import MaskSemanticMapper

ADE_VAL = BENCHMARKS_BY_NAME["ade20k_150_sem_seg_val"]
VOC_VAL = BENCHMARKS_BY_NAME["pascal_voc_21_sem_seg_val"]


def _semantic_split(root, bench, stems, labelled, size=(24, 32)):
    """Images for `stems` and label maps for `labelled` in the row's layout."""
    rng = np.random.default_rng(0)
    layout = ((bench.image_dir, stems, bench.image_ext), (bench.sem_seg_dir, labelled, bench.label_ext))
    for folder, names, ext in layout:
        os.makedirs(root / folder, exist_ok=True)
        for n in names:
            arr = rng.integers(0, 255, (*size, 3) if folder == bench.image_dir else size, dtype=np.uint8)
            Image.fromarray(arr).save(root / folder / f"{n}.{ext}")


def test_image_without_label_map_is_an_error_naming_it(tmp_path):
    stems = [f"ADE_val_{i:08d}" for i in range(1, 7)]
    _semantic_split(tmp_path, ADE_VAL, stems, stems[:2] + stems[3:])  # the third image lost its label map
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) .* no label map.*ADE_val_00000003\.png"):
        load_semantic(ADE_VAL, str(tmp_path))
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(tmp_path / ADE_VAL.sem_seg_dir / f"{stems[2]}.png")
    assert len(load_semantic(ADE_VAL, str(tmp_path))) == 6
    # ... and through the catalog, as evaluation loads it
    register_all_ovseg_datasets(str(tmp_path))
    try:
        os.remove(tmp_path / ADE_VAL.sem_seg_dir / f"{stems[5]}.png")
        with pytest.raises(FileNotFoundError, match="ADE_val_00000006"):
            DatasetCatalog.get(ADE_VAL.name)
    finally:
        register_all_ovseg_datasets()


def test_label_map_without_image_and_shared_image_folders(tmp_path):
    stems = ["2008_000001", "2008_000002", "2008_000003"]
    _semantic_split(tmp_path, VOC_VAL, stems + ["2008_000099"], stems)  # JPEGImages also holds a train image
    assert [r["image_id"] for r in load_semantic(VOC_VAL, str(tmp_path))] == stems
    os.remove(tmp_path / VOC_VAL.image_dir / "2008_000002.jpg")
    with pytest.raises(FileNotFoundError, match=r"1 label map\(s\) .* no image.*2008_000002\.jpg"):
        load_semantic(VOC_VAL, str(tmp_path))


def test_label_of_another_size_names_both_files(tmp_path):
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(tmp_path / "a.jpg")
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "a.png")
    mapper = MaskSemanticMapper(augmentations=[T.ResizeShortestEdge(64, 128)])
    with pytest.raises(ValueError, match=r"a\.png' is 40x30 .* image '.*a\.jpg' is 48x32"):
        mapper({"file_name": str(tmp_path / "a.jpg"), "sem_seg_file_name": str(tmp_path / "a.png")})


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    grey = np.arange(24 * 32, dtype=np.int64).reshape(24, 32) * 85  # 0 .. 65195
    grey[0, 0], grey[0, 1] = 65535, 257
    path = tmp_path / "g16.png"
    Image.fromarray(grey.astype(np.uint16)).save(path)
    expected = np.rint(grey / 257.0).astype(np.uint8)  # the full 16-bit range onto 0..255
    rgb = read_image(str(path), "RGB")
    assert rgb.dtype == np.uint8 and rgb.shape == (24, 32, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], expected)
    assert rgb[0, 0, 0] == 255 and rgb[0, 1, 0] == 1
    # 8-bit images are read exactly as detectron2 reads them
    from detectron2.data.detection_utils import read_image as d2_read

    Image.fromarray(expected).save(tmp_path / "g8.png")
    np.testing.assert_array_equal(read_image(str(tmp_path / "g8.png"), "BGR"), d2_read(str(tmp_path / "g8.png"), "BGR"))
    # the training mapper feeds the scaled image
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(tmp_path / "g16_label.png")
    out = MaskSemanticMapper(augmentations=[])({"file_name": str(path), "sem_seg_file_name":
                                                str(tmp_path / "g16_label.png")})
    np.testing.assert_array_equal(out["image"][0].numpy(), expected)



# ---------------------------------------------------------------------------------------------- evaluation inputs
def _grey16(path, h=24, w=32):
    grey = (np.arange(h * w, dtype=np.int64).reshape(h, w) * 85) % 65536
    Image.fromarray(grey.astype(np.uint16)).save(path)
    return np.rint(grey / 257.0).astype(np.uint8)  # written-out rule: the 16-bit range onto 0..255


def test_test_mapper_scales_16bit_images(tmp_path):
    from ovseg.config import get_ovseg_cfg
    from ovseg.engine import build_mapper

    expected = _grey16(tmp_path / "g16.png")
    cfg = get_ovseg_cfg()
    cfg.INPUT.MIN_SIZE_TEST = 0  # no resize: the pixels themselves are compared
    record = {"file_name": str(tmp_path / "g16.png"), "image_id": 0, "height": 24, "width": 32}
    out = build_mapper(cfg, is_train=False)(record)
    assert out["image"].shape == (3, 24, 32) and out["image"].dtype == torch.uint8
    for c in range(3):
        np.testing.assert_array_equal(out["image"][c].numpy(), expected)
    # with a resize, the same transform detectron2's own test mapper applies (8-bit image: nothing to scale)
    Image.fromarray(np.stack([expected] * 3, -1)).save(tmp_path / "rgb8.png")
    cfg.INPUT.MIN_SIZE_TEST = 48
    record8 = {"file_name": str(tmp_path / "rgb8.png"), "image_id": 0, "height": 24, "width": 32}
    ours = build_mapper(cfg, is_train=False)(record8)["image"]
    theirs = DatasetMapper(cfg, False)(record8)["image"]
    assert torch.equal(ours, theirs)


def test_clipself_mappers_scale_16bit_images(tmp_path):
    from ovseg.data.clipself_mapper import CLIPSelfDatasetMapper, RegionRecognitionDatasetMapper

    expected = _grey16(tmp_path / "g16.png")
    out = CLIPSelfDatasetMapper(sizes=[32], crop_size=8, max_regions=1, grid_max_split=1)(
        {"file_name": str(tmp_path / "g16.png"), "image_id": 0})
    np.testing.assert_array_equal(out["image"][0, :24].numpy(), expected)  # longest side 32: no resize
    pan = np.zeros((24, 32, 3), np.uint8)
    pan[:, 16:, 0] = 1  # segment id 1 on the right half
    Image.fromarray(pan).save(tmp_path / "pan.png")
    out = RegionRecognitionDatasetMapper(size=32, min_size=1)(
        {"file_name": str(tmp_path / "g16.png"), "pan_seg_file_name": str(tmp_path / "pan.png"),
         "segments_info": [{"id": 1, "category_id": 3, "isthing": True}]})
    np.testing.assert_array_equal(out["image"][1].numpy(), expected)
    assert out["region_classes"].tolist() == [3] and out["region_boxes"].tolist() == [[16.0, 0.0, 32.0, 24.0]]


@pytest.mark.parametrize("label_size", [(30, 40), (32, 24)])  # (H, W); 32x24 has the image's pixel count
def test_sem_seg_evaluator_names_label_and_image_of_other_sizes(tmp_path, label_size):
    from detectron2.data import MetadataCatalog

    from ovseg.evaluation import OVSemSegEvaluator

    Image.fromarray(np.zeros(label_size, np.uint8)).save(tmp_path / "a.png")
    name = f"_ovseg_size_mismatch_{label_size[0]}"
    DatasetCatalog.register(name, lambda: [{"file_name": str(tmp_path / "a.jpg"),
                                            "sem_seg_file_name": str(tmp_path / "a.png")}])
    MetadataCatalog.get(name).set(stuff_classes=["a", "b"], ignore_label=255, evaluator_type="sem_seg")
    try:
        ev = OVSemSegEvaluator(name, distributed=False)
        ev.reset()
        logits = torch.zeros(2, 24, 32)  # the prediction has its image's size, 32x24 (WxH)
        h, w = label_size
        with pytest.raises(ValueError, match=rf"a\.png' is {w}x{h} .* image '.*a\.jpg' is 32x24"):
            ev.process([{"file_name": str(tmp_path / "a.jpg")}], [{"sem_seg": logits}])
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


# ---------------------------------------------------------------------------------------------- JSON-listed files
ADE_PAN = BENCHMARKS_BY_NAME["ade20k_150_panoptic_val"]
ADE_INST = BENCHMARKS_BY_NAME["ade20k_150_instance_val"]


def _ade_panoptic(root, n=3):
    """n images + panoptic PNGs + semantic maps + the panoptic and instance JSONs of the ADE20K rows."""
    from ovseg.data.image_io import id2rgb

    for folder in (ADE_PAN.image_dir, ADE_PAN.panoptic_dir, ADE_PAN.sem_seg_dir):
        os.makedirs(root / folder, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        stem = f"ADE_val_{i + 1:08d}"
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / ADE_PAN.image_dir / f"{stem}.jpg")
        Image.fromarray(id2rgb(np.ones((8, 8), np.int64))).save(root / ADE_PAN.panoptic_dir / f"{stem}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / ADE_PAN.sem_seg_dir / f"{stem}.png")
        images.append({"id": i, "file_name": f"{stem}.jpg", "height": 8, "width": 8})
        anns.append({"image_id": i, "file_name": f"{stem}.png", "segments_info": [
            {"id": 1, "category_id": 0, "iscrowd": 0, "area": 64, "bbox": [0, 0, 8, 8]}]})
    cats = [{"id": 0, "name": "wall", "isthing": 0}]
    (root / ADE_PAN.panoptic_json).write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    things = load_class_table(ADE_INST.table)
    thing_id = next(c.dataset_id for c in things if c.isthing)
    inst = [{"id": i + 1, "image_id": i, "category_id": thing_id, "bbox": [0, 0, 4, 4], "area": 16, "iscrowd": 0,
             "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]} for i in range(n)]
    (root / ADE_INST.instance_json).write_text(json.dumps(
        {"images": images, "annotations": inst, "categories": [{"id": thing_id, "name": "thing"}]}))
    return [f"ADE_val_{i + 1:08d}" for i in range(n)]


@pytest.mark.parametrize("folder, suffix", [("image_dir", ".jpg"), ("panoptic_dir", ".png"), ("sem_seg_dir", ".png")])
def test_panoptic_loader_checks_every_listed_file(tmp_path, folder, suffix):
    stems = _ade_panoptic(tmp_path)
    assert len(load_panoptic(ADE_PAN, str(tmp_path))) == 3
    missing = tmp_path / getattr(ADE_PAN, folder) / f"{stems[2]}{suffix}"  # not the first record's
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match=rf"1 file\(s\) .* missing, e\.g\. .*{re.escape(str(missing))}"):
        load_panoptic(ADE_PAN, str(tmp_path))


def test_instance_loader_checks_every_listed_image(tmp_path):
    stems = _ade_panoptic(tmp_path)
    assert len(load_instances(ADE_INST, str(tmp_path))) == 3
    os.remove(tmp_path / ADE_INST.image_dir / f"{stems[1]}.jpg")
    with pytest.raises(FileNotFoundError, match=rf"1 file\(s\) .* missing.*{stems[1]}\.jpg"):
        load_instances(ADE_INST, str(tmp_path))


# ---------------------------------------------------------------------------------------------- output folders
@pytest.mark.parametrize("name", ["folder:/abs/path/", "coco:../x/panoptic.json", "custom:a b/c.yaml",
                                  "folder:" + "/deep" * 40, ".."])
def test_dataset_folder_name_is_one_safe_component(name):
    from ovseg.data.custom import dataset_folder_name

    folder = dataset_folder_name(name)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", folder) and folder not in (".", "..") and len(folder) <= 100
    assert os.path.basename(os.path.join("/out", folder)) == folder


def test_dataset_folder_names_stay_distinct_and_benchmarks_unchanged():
    from ovseg.data.custom import dataset_folder_name

    names = ["folder:/a/b", "folder:/a_b", "folder:/a/b/", "folder:a/b"] + [b.name for b in BENCHMARKS_BY_NAME.values()]
    folders = [dataset_folder_name(n) for n in names]
    assert len(set(folders)) == len(names)
    assert all(dataset_folder_name(b) == b for b in list(BENCHMARKS_BY_NAME) + ["_my_registered_set"])


def test_evaluator_output_folder_is_directly_under_inference(tmp_path):
    from detectron2.data import MetadataCatalog

    from ovseg.config import get_ovseg_cfg
    from ovseg.engine import Trainer

    name = f"folder:{tmp_path}/my data/"
    DatasetCatalog.register(name, lambda: [{"file_name": "a.jpg", "sem_seg_file_name": "a.png"}])
    MetadataCatalog.get(name).set(stuff_classes=["a"], ignore_label=255, evaluator_type="sem_seg")
    try:
        cfg = get_ovseg_cfg()
        cfg.MODEL.META_ARCHITECTURE = "CLIPDenseSegmentor"
        cfg.OUTPUT_DIR = str(tmp_path / "out")
        evaluator = Trainer.build_evaluator(cfg, name)
        evaluators = getattr(evaluator, "_evaluators", [evaluator])
        dirs = {e._output_dir for e in evaluators if getattr(e, "_output_dir", None)}
        assert dirs and all(os.path.dirname(d) == os.path.join(cfg.OUTPUT_DIR, "inference") for d in dirs), dirs
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
