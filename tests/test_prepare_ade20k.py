"""ADE20K-150 from a miniature raw download (official formats) to detectron2's evaluators."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from ovseg.data import load_class_table, register_all_ovseg_datasets
from ovseg.data.image_io import rgb2id
from ovseg.evaluation import OVSegPanopticEvaluator, OVSemSegEvaluator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "datasets"))
import prepare_ade20k_150  # noqa: E402

# two thing classes of ADE-150 (0-based index) and the instance-challenge ids standing for them
THINGS = [i for i, c in enumerate(load_class_table("ade20k_150")) if c.isthing][:2]
INSTANCE_IDS = {7: THINGS[0], 9: THINGS[1]}


def make_raw_ade(root: Path, n: int = 3):
    """ADEChallengeData2016 as downloaded: JPEG images, label PNGs (0 = other, 1..150), instance PNGs
    (R = instance-challenge category, G = instance index) and categoryMapping.txt."""
    ade = root / "ADEChallengeData2016"
    for sub in ("images/validation", "annotations/validation", "annotations_instance/validation"):
        (ade / sub).mkdir(parents=True)
    (ade / "categoryMapping.txt").write_text(
        "Instance_id ADE_id Name\n" + "".join(f"{k} {v + 1} thing{k}\n" for k, v in INSTANCE_IDS.items()))
    rng = np.random.default_rng(0)
    for i in range(n):
        label = np.zeros((32, 48), np.uint8)
        label[:16] = 1 + 2  # class index 2 ("sky", stuff)
        label[16:, :24] = 1 + 3  # class index 3 ("floor", stuff)
        inst = np.zeros((32, 48, 3), np.uint8)
        label[20:28, 28:36] = 1 + THINGS[0]
        inst[20:28, 28:36] = (7, 1, 0)
        label[4:10, 30:44] = 1 + THINGS[1]
        inst[4:10, 30:44] = (9, 2, 0)
        name = f"ADE_val_{i:08d}"
        image = rng.integers(0, 256, (32, 48, 3)).astype(np.uint8)
        Image.fromarray(image).save(ade / "images/validation" / f"{name}.jpg")
        Image.fromarray(label).save(ade / "annotations/validation" / f"{name}.png")
        Image.fromarray(inst).save(ade / "annotations_instance/validation" / f"{name}.png")
    return ade


@pytest.fixture
def prepared(tmp_path):
    ade = make_raw_ade(tmp_path)
    prepare_ade20k_150.main(["--root", str(tmp_path), "--splits", "validation", "--workers", "1"])
    register_all_ovseg_datasets(str(tmp_path))
    yield ade
    register_all_ovseg_datasets()


def test_semantic_labels_and_evaluator(prepared):
    raw = np.array(Image.open(prepared / "annotations/validation/ADE_val_00000000.png"))
    out = np.array(Image.open(prepared / "annotations_detectron2/validation/ADE_val_00000000.png"))
    assert np.array_equal(out, np.where(raw == 0, 255, raw.astype(np.int64) - 1))
    name = "ade20k_150_sem_seg_val"
    records = DatasetCatalog.get(name)
    assert len(records) == 3
    ev = OVSemSegEvaluator(name, distributed=False)
    ev.reset()
    conf = np.zeros((150, 150), np.int64)
    for r in records:  # half-right prediction: "floor" predicted as "sky", unlabelled pixels as "wall"
        gt = np.array(Image.open(r["sem_seg_file_name"])).astype(np.int64)
        pred = np.where(gt == 3, 2, np.where(gt == 255, 0, gt))
        ev.process([r], [{"sem_seg": torch.nn.functional.one_hot(torch.from_numpy(pred), 150).permute(2, 0, 1)}])
        valid = gt != 255
        np.add.at(conf, (gt[valid], pred[valid]), 1)
    res = ev.evaluate()["sem_seg"]
    union = conf.sum(0) + conf.sum(1) - np.diag(conf)
    present = conf.sum(1) > 0  # detectron2 averages over the classes present in the ground truth
    assert res["mIoU"] == pytest.approx(100 * np.mean(np.diag(conf)[present] / union[present]), abs=1e-6)
    assert res["IoU-floor"] == 0 and res["IoU-sky"] < 100


def test_panoptic_annotations_and_perfect_pq(prepared):
    meta = MetadataCatalog.get("ade20k_150_panoptic_val")
    data = json.loads(Path(meta.panoptic_json).read_text())
    assert len(data["images"]) == 3 and len(data["categories"]) == 150
    seg_info = data["annotations"][0]["segments_info"]
    assert sorted(s["category_id"] for s in seg_info) == sorted([2, 3] + THINGS)
    instances = json.loads(Path(meta.json_file).read_text())
    assert len(instances["annotations"]) == 6  # two things per image
    records = DatasetCatalog.get("ade20k_150_panoptic_val")
    ev = OVSegPanopticEvaluator("ade20k_150_panoptic_val")
    ev.reset()
    for r in records:  # the ground truth itself as the prediction
        pan = rgb2id(np.array(Image.open(r["pan_seg_file_name"])))
        info = [{"id": s["id"], "category_id": s["category_id"], "isthing": s["isthing"]} for s in r["segments_info"]]
        ev.process([r], [{"panoptic_seg": (torch.from_numpy(pan), info)}])
    res = ev.evaluate()["panoptic_seg"]
    assert res["PQ"] == pytest.approx(100.0) and res["PQ_th"] == pytest.approx(100.0)


def test_idempotent_and_clear_errors(prepared, tmp_path):
    before = (prepared / "ade20k_panoptic_val.json").stat().st_mtime_ns
    prepare_ade20k_150.main(["--root", str(tmp_path), "--splits", "validation", "--workers", "1"])
    assert (prepared / "ade20k_panoptic_val.json").stat().st_mtime_ns == before
    with pytest.raises(Exception, match="ADE20K folder"):
        prepare_ade20k_150.main(["--root", str(tmp_path / "empty")])


def test_evaluator_reads_label_maps_as_the_argmax_of_scores(prepared):
    """MODEL.SEM_SEG_OUTPUT "labels": an (H, W) sem_seg scores the same as (C, H, W) scores with that argmax."""
    name = "ade20k_150_sem_seg_val"
    results = []
    for as_labels in (False, True):
        ev = OVSemSegEvaluator(name, distributed=False)
        ev.reset()
        for r in DatasetCatalog.get(name):
            gt = np.array(Image.open(r["sem_seg_file_name"])).astype(np.int64)
            pred = torch.from_numpy(np.where(gt == 3, 2, np.where(gt == 255, 0, gt)))
            scores = torch.nn.functional.one_hot(pred, 150).permute(2, 0, 1).float()
            ev.process([r], [{"sem_seg": pred if as_labels else scores}])
        results.append(ev.evaluate()["sem_seg"])
    assert results[0]["mIoU"] < 100
    assert results[0].keys() == results[1].keys()
    assert all(np.isclose(results[0][k], results[1][k], equal_nan=True) for k in results[0])
