"""Every benchmark besides ADE20K-150 (tests/test_prepare_ade20k.py): a miniature raw download in the official
format -> datasets/prepare_*.py -> table registration -> DatasetCatalog -> detectron2's evaluators, with the
numbers checked against an independent computation."""
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import scipy.io
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from ovseg.data import load_class_table, register_all_ovseg_datasets
from ovseg.data.image_io import id2rgb, rgb2id
from ovseg.data.prepare_utils import PrepareError
from ovseg.evaluation import OVSegPanopticEvaluator, OVSemSegEvaluator

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "datasets"))
import prepare_ade20k_847  # noqa: E402
import prepare_cityscapes  # noqa: E402
import prepare_coco_object  # noqa: E402
import prepare_coco_panoptic  # noqa: E402
import prepare_coco_stuff  # noqa: E402
import prepare_pascal_context  # noqa: E402
import prepare_pascal_voc  # noqa: E402

H, W = 24, 32
RNG = np.random.default_rng(0)


def save_jpg(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (H, W, 3)).astype(np.uint8)).save(path)


def save_png(array, path: Path, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if mode == "P":
        img = img.convert("L").convert("P")  # palette image whose indices are the values
        img.putdata(array.reshape(-1).tolist())
    img.save(path)


def blocks(values):
    """An (H, W) map made of four quadrants holding `values`."""
    out = np.empty((H, W), np.int64)
    out[: H // 2, : W // 2], out[: H // 2, W // 2:], out[H // 2:, : W // 2], out[H // 2:, W // 2:] = values
    return out


@pytest.fixture
def root(tmp_path):
    yield tmp_path
    register_all_ovseg_datasets()  # back to the default root for the other tests


def half_right(gt: np.ndarray, num_classes: int, ignore: int) -> np.ndarray:
    """Prediction = ground truth on the left half, a wrong class on the right half."""
    pred = np.where(gt == ignore, 0, gt)
    pred[:, W // 2:] = (pred[:, W // 2:] + 1) % num_classes
    return pred


def reference_miou(pairs, num_classes, ignore):
    """mIoU as detectron2 defines it (mean over classes present in the ground truth), by direct mask counting."""
    ious = []
    for c in range(num_classes):
        inter = union = gt_pixels = 0
        for pred, gt in pairs:
            valid = gt != ignore
            inter += np.sum((pred == c) & (gt == c) & valid)
            union += np.sum(((pred == c) | (gt == c)) & valid)
            gt_pixels += np.sum((gt == c) & valid)
        if gt_pixels:
            ious.append(inter / union)
    return 100 * float(np.mean(ious))


def evaluate_semantic(name, pred_fn):
    meta = MetadataCatalog.get(name)
    records = DatasetCatalog.get(name)
    num_classes, ignore = len(meta.stuff_classes), meta.ignore_label
    evaluator = OVSemSegEvaluator(name, distributed=False)
    evaluator.reset()
    pairs = []
    for r in records:
        gt = np.array(Image.open(r["sem_seg_file_name"])).astype(np.int64)
        pred = pred_fn(gt, num_classes, ignore)
        logits = torch.nn.functional.one_hot(torch.from_numpy(pred), num_classes).permute(2, 0, 1).float()
        evaluator.process([{"file_name": r["file_name"]}], [{"sem_seg": logits}])
        pairs.append((pred, gt))
    res = evaluator.evaluate()["sem_seg"]
    return res, reference_miou(pairs, num_classes, ignore)


def check_semantic(name, n_images):
    assert len(DatasetCatalog.get(name)) == n_images
    assert all(os.path.isfile(r["file_name"]) for r in DatasetCatalog.get(name))
    res, _ = evaluate_semantic(name, lambda gt, c, ig: np.where(gt == ig, 0, gt))
    assert res["mIoU"] == pytest.approx(100.0) and res["pACC"] == pytest.approx(100.0)
    res, ref = evaluate_semantic(name, half_right)
    assert res["mIoU"] == pytest.approx(ref) and 0 < ref < 100
    return res


def mtimes(folder: Path):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- ADE20K-847 (full release, 16-bit output)
def make_ade_full(root: Path):
    table = load_class_table("ade20k_847")
    ids = [table[0].dataset_id, table[5].dataset_id, table[846].dataset_id, 7]  # 7: not one of the 847
    assert 7 not in {c.dataset_id for c in table}
    for i, scene in enumerate(["kitchen", "street"]):
        base = root / f"ADE20K_2021_17_01/images/ADE/validation/urban/{scene}/ADE_val_{i:08d}"
        save_jpg(base.with_suffix(".jpg"))
        cls = blocks(np.roll(ids, i))
        seg = np.zeros((H, W, 3), np.uint8)
        seg[..., 0], seg[..., 1], seg[..., 2] = cls // 256 * 10, cls % 256, 3  # B: instance masks, unused
        save_png(seg, base.parent / (base.name + "_seg.png"))
    return {table[0].dataset_id: 0, table[5].dataset_id: 5, table[846].dataset_id: 846, 7: 65535}


def test_ade20k_847(root):
    expected = make_ade_full(root)
    prepare_ade20k_847.main(["--root", str(root), "--workers", "2"])
    register_all_ovseg_datasets(str(root))
    label = np.array(Image.open(root / "ADE20K_2021_17_01/annotations_detectron2/validation/ADE_val_00000000.tif"))
    assert label.dtype == np.uint16
    assert sorted(np.unique(label).tolist()) == sorted(expected.values())
    res = check_semantic("ade20k_847_sem_seg_val", 2)
    assert "mIoU-unseen" in res  # ADE-847 has classes outside COCO's vocabulary
    before = mtimes(root / "ADE20K_2021_17_01")
    prepare_ade20k_847.main(["--root", str(root), "--workers", "1"])  # idempotent: nothing rewritten
    assert mtimes(root / "ADE20K_2021_17_01") == before


# ---------------------------------------------------------------- Pascal Context 59 / 459 (.mat files)
def make_pascal_context(root: Path, ids=("2008_000002", "2008_000003")):
    voc = root / "VOCdevkit/VOC2010"
    names = [c.official_name for c in load_class_table("pascal_context_459")]
    labels = [names.index("table") + 1, names.index("accordion") + 1, names.index("sky") + 1, 0]
    for i, image_id in enumerate(ids):
        save_jpg(voc / "JPEGImages" / f"{image_id}.jpg")
        (voc / "trainval").mkdir(parents=True, exist_ok=True)
        label_map = blocks(np.roll(labels, i)).astype(np.uint16)
        scipy.io.savemat(voc / "trainval" / f"{image_id}.mat", {"LabelMap": label_map})
    ids_file = root / "val_ids.txt"
    ids_file.write_text("\n".join(ids) + "\n")
    return voc, ids_file, labels


def test_pascal_context_59_60_and_459(root):
    voc, ids_file, labels = make_pascal_context(root)
    prepare_pascal_context.main(["--root", str(root), "--val-ids", str(ids_file), "--workers", "1"])
    register_all_ovseg_datasets(str(root))
    pc59 = [c.official_name for c in load_class_table("pascal_context_59")]
    l59 = np.array(Image.open(voc / "annotations_detectron2/pc59_val/2008_000002.png"))
    l60 = np.array(Image.open(voc / "annotations_detectron2/pc60_val/2008_000002.png"))
    l459 = np.array(Image.open(voc / "annotations_detectron2/pc459_val/2008_000002.tif"))
    # table (459) is diningtable (59); accordion is not one of the 59; 0 = unlabelled
    assert l59[0, 0] == pc59.index("diningtable") and l59[0, -1] == 255 and l59[-1, 0] == pc59.index("sky")
    assert l59[-1, -1] == 255
    # PC-60: the 59 one up, accordion and unlabelled are background (0), nothing is ignored
    expected60 = blocks([pc59.index("diningtable") + 1, 0, pc59.index("sky") + 1, 0])
    assert l60.dtype == np.uint8 and (l60 == expected60).all()
    assert l459[0, 0] == labels[0] - 1 and l459[-1, -1] == 65535 and l459.dtype == np.uint16
    pc60 = MetadataCatalog.get("pascal_context_60_sem_seg_val")
    assert pc60.stuff_classes[0] == "background" and pc60.ignore_label == 255 and pc60.evaluator_type == "sem_seg"
    assert pc60.stuff_classes[1:] == MetadataCatalog.get("pascal_context_59_sem_seg_val").stuff_classes
    assert len(pc60.stuff_classes) == 60 and pc60.stuff_classes[pc59.index("sky") + 1] == "sky"
    check_semantic("pascal_context_59_sem_seg_val", 2)
    check_semantic("pascal_context_60_sem_seg_val", 2)
    check_semantic("pascal_context_459_sem_seg_val", 2)


def test_pascal_context_60_is_added_to_a_prepared_59_and_459(root):
    """An earlier prepare run (59 + 459 only) is completed with pc60_val; the existing outputs are kept."""
    voc, ids_file, _ = make_pascal_context(root)
    prepare_pascal_context.main(["--root", str(root), "--val-ids", str(ids_file), "--workers", "1"])
    for path in (voc / "annotations_detectron2/pc60_val").iterdir():
        path.unlink()
    before = mtimes(voc / "annotations_detectron2")
    prepare_pascal_context.main(["--root", str(root), "--val-ids", str(ids_file), "--workers", "1"])
    after = mtimes(voc / "annotations_detectron2")
    assert {p: t for p, t in after.items() if p in before} == before
    assert sorted(p.name for p in after if p not in before) == ["2008_000002.png", "2008_000003.png"]


def test_pascal_context_malformed_mat(root):
    voc, ids_file, _ = make_pascal_context(root, ids=("2008_000002",))
    scipy.io.savemat(voc / "trainval/2008_000002.mat", {"Labels": np.zeros((4, 4), np.uint16)})
    with pytest.raises(PrepareError, match="2008_000002.mat.*LabelMap"):
        prepare_pascal_context.main(["--root", str(root), "--val-ids", str(ids_file), "--workers", "1"])
    assert not (voc / "annotations_detectron2/pc59_val/2008_000002.png").exists()


# ---------------------------------------------------------------- Pascal VOC 20 / 21 (palette PNGs)
def make_voc(root: Path, ids=("2007_000033", "2007_000042", "2007_000061")):
    voc = root / "VOCdevkit/VOC2012"
    for i, image_id in enumerate(ids):
        save_jpg(voc / "JPEGImages" / f"{image_id}.jpg")
        label = blocks(np.roll([0, 1, 15, 20], i)).astype(np.uint8)
        label[0, :] = 255  # object boundary
        save_png(label, voc / "SegmentationClass" / f"{image_id}.png", mode="P")
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    return voc


def test_pascal_voc_20_and_21(root):
    voc = make_voc(root)
    prepare_pascal_voc.main(["--root", str(root), "--workers", "2"])
    register_all_ovseg_datasets(str(root))
    raw = np.array(Image.open(voc / "SegmentationClass/2007_000033.png"))
    v21 = np.array(Image.open(voc / "annotations_detectron2/voc21_val/2007_000033.png"))
    v20 = np.array(Image.open(voc / "annotations_detectron2/voc20_val/2007_000033.png"))
    assert (v21 == raw).all()
    assert (v20 == np.where((raw == 0) | (raw == 255), 255, raw - 1)).all()
    assert MetadataCatalog.get("pascal_voc_20_sem_seg_val").stuff_classes[0] == "aeroplane"
    check_semantic("pascal_voc_20_sem_seg_val", 3)
    check_semantic("pascal_voc_21_sem_seg_val", 3)


def test_pascal_voc_rgb_label_is_rejected(root):
    voc = make_voc(root, ids=("2007_000033",))
    save_png(np.zeros((H, W, 3), np.uint8), voc / "SegmentationClass/2007_000033.png")
    with pytest.raises(PrepareError, match="2007_000033.png.*mode 'RGB'"):
        prepare_pascal_voc.main(["--root", str(root), "--workers", "1"])


# ---------------------------------------------------------------- COCO panoptic -> semantic, panoptic evaluator
def make_coco_panoptic(root: Path, n=2):
    coco = root / "coco"
    cats = load_class_table("coco_panoptic_133")
    person, car, sky, wall = (cats[i] for i in (0, 2, 119, 131))
    assert (person.name, sky.name, wall.name) == ("person", "sky", "wall")
    images, annotations = [], []
    for i in range(n):
        stem = f"{139 + i:012d}"
        save_jpg(coco / "val2017" / f"{stem}.jpg")
        seg = np.zeros((H, W), np.int64)
        segments = []
        for sid, (cat, sl) in enumerate([(sky, np.s_[: H // 2, :]), (wall, np.s_[H // 2:, : W // 2]),
                                         (person, np.s_[H // 2:, W // 2: W // 2 + 6]),
                                         (car, np.s_[H // 2 + 4:, W // 2 + 8:])], start=1):
            seg[sl] = sid * 37 + i
            segments.append({"id": sid * 37 + i, "category_id": cat.dataset_id, "iscrowd": 0,
                             "area": int((seg == sid * 37 + i).sum()), "bbox": [0, 0, 1, 1]})
        save_png(id2rgb(seg), coco / "panoptic_val2017" / f"{stem}.png")
        images.append({"id": 139 + i, "file_name": f"{stem}.jpg", "height": H, "width": W})
        annotations.append({"image_id": 139 + i, "file_name": f"{stem}.png", "segments_info": segments})
    categories = [{"id": c.dataset_id, "name": c.official_name, "isthing": int(c.isthing)} for c in cats]
    (coco / "annotations").mkdir(parents=True)
    with open(coco / "annotations/panoptic_val2017.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return coco


def brute_force_pq(gt_seg, gt_segments, pred_seg, pred_segments):
    """Panoptic quality of one image, straight from the definition (no crowd regions; void = id 0)."""
    stats = {}
    matched_pred = set()
    for g in gt_segments:
        stats.setdefault(g["category_id"], [0.0, 0, 0, 0])
        for p in pred_segments:
            if p["category_id"] != g["category_id"]:
                continue
            gm, pm = gt_seg == g["id"], pred_seg == p["id"]
            inter = np.sum(gm & pm)
            union = np.sum(gm) + np.sum(pm & (gt_seg != 0)) - inter
            if inter / union > 0.5:
                stats[g["category_id"]][0] += inter / union
                stats[g["category_id"]][1] += 1
                matched_pred.add(p["id"])
                break
        else:
            stats[g["category_id"]][3] += 1
    for p in pred_segments:
        if p["id"] not in matched_pred:
            pm = pred_seg == p["id"]
            if np.sum(pm & (gt_seg == 0)) / np.sum(pm) <= 0.5:
                stats.setdefault(p["category_id"], [0.0, 0, 0, 0])[2] += 1
    pqs = [iou / (tp + 0.5 * fp + 0.5 * fn) for iou, tp, fp, fn in stats.values()]
    return 100 * float(np.mean(pqs))


def test_coco_panoptic_semantic_and_pq(root):
    coco = make_coco_panoptic(root, n=1)
    prepare_coco_panoptic.main(["--root", str(root), "--splits", "val", "--workers", "1"])
    register_all_ovseg_datasets(str(root))
    name = "coco_2017_val_panoptic_with_sem_seg"
    sem = np.array(Image.open(coco / "panoptic_semseg_val2017/000000000139.png"))
    assert sem[0, 0] == 119 and sem[-1, 0] == 131 and sem[-1, W // 2] == 0
    assert set(np.unique(sem).tolist()) == {0, 2, 119, 131, 255}  # 255: void between segments
    check_semantic(name, 1)

    record = DatasetCatalog.get(name)[0]
    meta = MetadataCatalog.get(name)
    gt_seg = rgb2id(np.array(Image.open(record["pan_seg_file_name"])))
    # prediction: the sky segment shrunk by 3/4 (IoU 0.25: FP + FN), the car predicted as a truck (FP + FN)
    pred_seg = gt_seg.copy()
    sky_id = record["segments_info"][0]["id"]
    pred_seg[(gt_seg == sky_id) & (np.arange(W)[None, :] >= W // 4)] = 0
    pred_info = []
    for s in record["segments_info"]:
        cat = s["category_id"] if s["category_id"] != 2 else 7  # contiguous 2 = car -> 7 = truck
        pred_info.append({"id": s["id"], "category_id": cat, "isthing": s["isthing"]})
    evaluator = OVSegPanopticEvaluator(name)
    evaluator.reset()
    evaluator.process([record], [{"panoptic_seg": (torch.from_numpy(pred_seg), pred_info)}])
    res = evaluator.evaluate()["panoptic_seg"]
    to_dataset = {v: k for k, v in meta.stuff_dataset_id_to_contiguous_id.items()}
    gt_segments = [dict(s, category_id=to_dataset[s["category_id"]]) for s in record["segments_info"]]
    pred_segments = [dict(s, category_id=to_dataset[s["category_id"]]) for s in pred_info]
    assert res["PQ"] == pytest.approx(brute_force_pq(gt_seg, gt_segments, pred_seg, pred_segments))
    assert 0 < res["PQ"] < 100


def test_coco_panoptic_unknown_category_is_rejected(root):
    coco = make_coco_panoptic(root, n=1)
    data = json.loads((coco / "annotations/panoptic_val2017.json").read_text())
    data["annotations"][0]["segments_info"][0]["category_id"] = 91  # not a panoptic category
    (coco / "annotations/panoptic_val2017.json").write_text(json.dumps(data))
    with pytest.raises(PrepareError, match="category 91"):
        prepare_coco_panoptic.main(["--root", str(root), "--splits", "val", "--workers", "1"])


# ---------------------------------------------------------------- COCO-Stuff-164k
def test_coco_stuff(root):
    coco = root / "coco"
    cats = load_class_table("coco_stuff_171")
    for i in range(2):
        stem = f"{285 + i:012d}"
        save_jpg(coco / "val2017" / f"{stem}.jpg")
        values = [cats[0].dataset_id - 1, cats[100].dataset_id - 1, 11, 255]  # 11 = id 12, unused by COCO
        label = blocks(np.roll(values, i)).astype(np.uint8)
        save_png(label, coco / "stuffthingmaps_trainval2017/val2017" / f"{stem}.png")
    prepare_coco_stuff.main(["--root", str(root), "--splits", "val", "--workers", "1"])
    register_all_ovseg_datasets(str(root))
    out = np.array(Image.open(coco / "stuffthingmaps_detectron2/val2017/000000000285.png"))
    assert out[0, 0] == 0 and out[0, -1] == 100 and out[-1, 0] == 255 and out[-1, -1] == 255
    check_semantic("coco_stuff_164k_sem_seg_val", 2)


# ---------------------------------------------------------------- COCO-Object (instances JSON -> background + 80)
def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (crowd annotations): run lengths in column-major order, starting with a 0-run."""
    flat = mask.astype(np.uint8).flatten(order="F")
    counts = [len(list(run)) for _, run in itertools.groupby(flat)]
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + counts}


def rect_polygon(x0, y0, x1, y1):
    return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def region(rows, cols):
    mask = np.zeros((H, W), bool)
    mask[rows, cols] = True
    return mask


def make_coco_object(root: Path):
    """Two val images: one with polygons (two-part person), an RLE dog over the person, a crowd car (uncompressed
    RLE) and a toothbrush; one without instances. Returns the expected label map of the first and where it is exact
    (pixels on a polygon's edge depend on the rasteriser)."""
    coco = root / "coco"
    person, car, dog, toothbrush = 1, 3, 18, 90  # COCO category ids -> COCO-Object labels 1, 3, 17, 80
    dog_mask, car_mask, brush_mask = region(np.s_[8:16], np.s_[8:20]), region(np.s_[16:], np.s_[20:]), \
        region(np.s_[:4], np.s_[28:])
    dog_rle = mask_util.encode(np.asfortranarray(dog_mask.astype(np.uint8)))
    dog_rle["counts"] = dog_rle["counts"].decode("ascii")
    annotations = [
        {"id": 11, "image_id": 1, "category_id": person, "iscrowd": 0,  # two parts: x 2..14 and x 20..26
         "segmentation": [rect_polygon(2, 2, 14, 14), rect_polygon(20, 2, 26, 7)]},
        {"id": 12, "image_id": 1, "category_id": dog, "iscrowd": 0, "segmentation": dog_rle},
        {"id": 13, "image_id": 1, "category_id": car, "iscrowd": 1, "segmentation": uncompressed_rle(car_mask)},
        {"id": 14, "image_id": 1, "category_id": toothbrush, "iscrowd": 0,
         "segmentation": uncompressed_rle(brush_mask)},
    ]
    for ann in annotations:
        ann.update(area=1.0, bbox=[0.0, 0.0, 1.0, 1.0])
    images = []
    for i in (1, 2):
        stem = f"{i:012d}"
        save_jpg(coco / "val2017" / f"{stem}.jpg")
        images.append({"id": i, "file_name": f"{stem}.jpg", "height": H, "width": W})
    categories = [{"id": c.dataset_id, "name": c.official_name, "supercategory": ""}
                  for c in load_class_table("coco_panoptic_133") if c.isthing]
    (coco / "annotations").mkdir(parents=True)
    with open(coco / "annotations/instances_val2017.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)

    expected = np.zeros((H, W), np.int64)
    exact = np.ones((H, W), bool)
    for x0, y0, x1, y1 in ((2, 2, 14, 14), (20, 2, 26, 7)):
        expected[y0 + 1: y1 - 1, x0 + 1: x1 - 1] = 1  # person interior
        exact[y0 - 1: y1 + 1, x0 - 1: x1 + 1] = False
        exact[y0 + 1: y1 - 1, x0 + 1: x1 - 1] = True
    expected[dog_mask], expected[car_mask], expected[brush_mask] = 17, 3, 80  # the dog is painted over the person
    exact |= dog_mask
    return coco, expected, exact


def test_coco_object(root):
    coco, expected, exact = make_coco_object(root)
    prepare_coco_object.main(["--root", str(root), "--workers", "1"])
    register_all_ovseg_datasets(str(root))
    out = coco / "coco_object_detectron2/val2017"
    label = np.array(Image.open(out / "000000000001.png"))
    assert label.dtype == np.uint8 and label.shape == (H, W)
    assert (label[exact] == expected[exact]).all()
    assert set(np.unique(label[~exact]).tolist()) <= {0, 1}  # polygon edges: person or background
    assert (np.array(Image.open(out / "000000000002.png")) == 0).all()  # no instances: all background
    meta = MetadataCatalog.get("coco_object_sem_seg_val")
    assert len(meta.stuff_classes) == 81 and meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
    names = meta.stuff_classes
    assert (names[0], names[1], names[3], names[17], names[80]) == ("background", "person", "car", "dog", "toothbrush")
    assert names[1:] == [n for n, c in zip(MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg").stuff_classes,
                                            load_class_table("coco_panoptic_133")) if c.isthing]
    check_semantic("coco_object_sem_seg_val", 2)
    before = mtimes(out)
    prepare_coco_object.main(["--root", str(root), "--workers", "2"])  # idempotent: nothing rewritten
    assert mtimes(out) == before


def test_coco_object_rejects_a_stuff_category(root):
    coco, _, _ = make_coco_object(root)
    data = json.loads((coco / "annotations/instances_val2017.json").read_text())
    data["annotations"][1]["category_id"] = 92  # a COCO-Stuff category, not one of the 80 things
    (coco / "annotations/instances_val2017.json").write_text(json.dumps(data))
    with pytest.raises(PrepareError, match="annotation 12 of 000000000001.jpg: category 92"):
        prepare_coco_object.main(["--root", str(root), "--workers", "1"])
    assert not (coco / "coco_object_detectron2/val2017/000000000001.png").exists()


# ---------------------------------------------------------------- Cityscapes (labelIds -> 19 trainIds)
# labelId -> trainId of cityscapesScripts' labels.py for the ids used here; 0 unlabeled, 4 static, 30 trailer: void
CITYSCAPES_TRAIN_ID = {7: 0, 8: 1, 26: 13, 33: 18, 0: 255, 4: 255, 30: 255}


def make_cityscapes(root: Path):
    cs = root / "cityscapes"
    frames = [("frankfurt", "frankfurt_000000_000294"), ("frankfurt", "frankfurt_000001_007973"),
              ("lindau", "lindau_000000_000019")]
    for i, (city, stem) in enumerate(frames):
        save_png(RNG.integers(0, 256, (H, W, 3)).astype(np.uint8), cs / "leftImg8bit/val" / city /
                 f"{stem}_leftImg8bit.png")
        gt = cs / "gtFine/val" / city
        label = blocks(np.roll([7, 26, 33, 0], i)).astype(np.uint8)  # road, car, bicycle, unlabeled
        label[0, :] = (4, 30, 8)[i]  # a row of static (void), trailer (void), sidewalk
        save_png(label, gt / f"{stem}_gtFine_labelIds.png")
        # the other files of gtFine_trainvaltest.zip, which neither the script nor the loader may read
        save_png(np.zeros((H, W, 3), np.uint8), gt / f"{stem}_gtFine_color.png")
        save_png(label.astype(np.uint16) * 1000, gt / f"{stem}_gtFine_instanceIds.png")  # 16-bit
        (gt / f"{stem}_gtFine_polygons.json").write_text("{}")
    return cs, frames


def test_cityscapes_19(root):
    cs, frames = make_cityscapes(root)
    prepare_cityscapes.main(["--root", str(root), "--workers", "1"])
    register_all_ovseg_datasets(str(root))
    for city, stem in frames:
        gt = cs / "gtFine/val" / city
        raw = np.array(Image.open(gt / f"{stem}_gtFine_labelIds.png"))
        out = np.array(Image.open(gt / f"{stem}_gtFine_labelTrainIds.png"))
        assert out.dtype == np.uint8 and (out == np.vectorize(CITYSCAPES_TRAIN_ID.get)(raw)).all()
    # lindau: sidewalk row over the quadrants bicycle, unlabeled / road, car
    assert (out[0, 0], out[1, 0], out[1, -1], out[-1, 0], out[-1, -1]) == (1, 18, 255, 0, 13)
    name = "cityscapes_19_sem_seg_val"
    meta = MetadataCatalog.get(name)
    assert len(meta.stuff_classes) == 19 and meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
    assert (meta.stuff_classes[0], meta.stuff_classes[13], meta.stuff_classes[18]) == ("road", "car", "bicycle")
    assert meta.stuff_colors[0] == [128, 64, 128] and meta.stuff_colors[18] == [119, 11, 32]
    records = DatasetCatalog.get(name)
    assert [r["image_id"] for r in records] == [stem for _, stem in frames]
    assert records[2]["file_name"] == str(cs / "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png")
    assert records[2]["sem_seg_file_name"].endswith("lindau/lindau_000000_000019_gtFine_labelTrainIds.png")
    # detectron2's own Cityscapes split (cityscapesScripts evaluator) is left alone
    assert MetadataCatalog.get("cityscapes_fine_sem_seg_val").evaluator_type == "cityscapes_sem_seg"
    check_semantic(name, 3)
    before = mtimes(cs)
    prepare_cityscapes.main(["--root", str(root), "--workers", "2"])  # idempotent: nothing rewritten
    assert mtimes(cs) == before


def test_cityscapes_rejects_train_ids_as_label_ids(root):
    cs, frames = make_cityscapes(root)
    city, stem = frames[0]
    save_png(np.full((H, W), 255, np.uint8), cs / "gtFine/val" / city / f"{stem}_gtFine_labelIds.png")
    with pytest.raises(PrepareError, match=f"{stem}_gtFine_labelIds.png: value 255 outside 0..33"):
        prepare_cityscapes.main(["--root", str(root), "--workers", "1"])


@pytest.mark.parametrize("script,missing", [(prepare_coco_object, "coco"), (prepare_cityscapes, "cityscapes")],
                         ids=["coco_object", "cityscapes"])
def test_missing_download_is_named(tmp_path, script, missing):
    folder = re.escape(str(tmp_path / missing))
    with pytest.raises(PrepareError, match=f"missing .* folder: {folder}\n.*download"):
        script.main(["--root", str(tmp_path), "--workers", "1"])
    (tmp_path / missing).mkdir()  # the folder alone: the missing file or sub-folder in it is named
    with pytest.raises(PrepareError, match=f"missing .*: {folder}/.*\n.*download"):
        script.main(["--root", str(tmp_path), "--workers", "1"])


# ---------------------------------------------------------------- command line
def test_cli_reports_missing_input(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "datasets/prepare_pascal_voc.py"), "--root", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert "missing VOC2012 folder" in proc.stderr and str(tmp_path / "VOCdevkit/VOC2012") in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("config", sorted((ROOT / "configs/eval").glob("*.yaml")), ids=lambda p: p.stem)
def test_eval_configs_name_registered_benchmarks(config):
    from ovseg.config import get_ovseg_cfg

    cfg = get_ovseg_cfg()
    cfg.merge_from_file(str(config))
    assert len(cfg.DATASETS.TEST) == 1 and cfg.DATASETS.TEST[0] in DatasetCatalog.list()
    assert cfg.MODEL.META_ARCHITECTURE  # the model comes from the base config
