"""Own data with no code: `folder:` / `coco:` / `custom:` dataset names, registered from DATASETS.* and used by
train_net.py (subprocesses on generated data; metrics checked against a confusion matrix written out here)."""
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from ovseg.data.custom import parse_dataset_name, register_custom_dataset, register_dataset_names
from tests.helpers import tiny_cfg
from tests.tiny_mask import tiny_mask_cfg

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["sky", "grass|lawn", "house"]


def make_folder(root: Path, n: int = 4, size=(48, 64), seed: int = 0) -> Path:
    """images/<sub>/img<i>.jpg + labels/<sub>/img<i>.png (blocks of classes 0..2 and 255) + classes.txt."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = "a" if i % 2 else "b"
        (root / "images" / sub).mkdir(parents=True, exist_ok=True)
        (root / "labels" / sub).mkdir(parents=True, exist_ok=True)
        h, w = size
        label = np.full((h, w), 255, np.uint8)
        label[: h // 2] = rng.integers(0, len(CLASSES))
        label[h // 2:, : w // 2] = rng.integers(0, len(CLASSES))
        label[h // 2:, w // 2 + 4:] = rng.integers(0, len(CLASSES))
        image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        image[label == 0] //= 3  # some signal for the model to learn
        Image.fromarray(image).save(root / "images" / sub / f"img{i}.jpg", quality=95)
        Image.fromarray(label).save(root / "labels" / sub / f"img{i}.png")
    (root / "classes.txt").write_text("# my classes\n" + "\n".join(CLASSES) + "\n")
    return root


@pytest.fixture
def registered():
    """Names registered by the test, removed afterwards (the catalogs are process-global)."""
    names = []

    def register(*new):
        names.extend(new)
        register_dataset_names(list(new))

    yield register
    for name in names:
        for catalog in (DatasetCatalog, MetadataCatalog):
            if name in catalog.list():
                catalog.remove(name)


def test_folder_records_and_metadata(tmp_path, registered):
    root = make_folder(tmp_path / "data")
    name = f"folder:{root}"
    registered(name)
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "sem_seg" and meta.ignore_label == 255
    assert meta.vocabulary == CLASSES and meta.stuff_classes == ["sky", "grass", "house"]
    assert meta.get("thing_dataset_id_to_contiguous_id", None) is None  # all stuff
    records = DatasetCatalog.get(name)
    labels = sorted(glob.glob(str(root / "labels" / "*" / "*.png")))
    assert [r["sem_seg_file_name"] for r in records] == labels
    assert [r["file_name"] for r in records] == [p.replace("/labels/", "/images/")[:-4] + ".jpg" for p in labels]


def test_custom_description_file(tmp_path, registered):
    root = make_folder(tmp_path / "data")
    os.rename(root / "labels", root / "masks")
    (root / "classes.txt").rename(root / "names.txt")
    desc = tmp_path / "data" / "mine.yaml"
    desc.write_text("format: folder\nimages: images\nlabels: masks\nclasses: names.txt\nignore_label: 0\n")
    name = f"custom:{desc}"
    registered(name)
    with pytest.raises(ValueError, match="beyond"):  # 255 is a label value now that 0 is the ignore label
        DatasetCatalog.get(name)
    desc.write_text("format: folder\nimages: images\nlabels: masks\nclasses: names.txt\n")
    register_custom_dataset(name)  # again: the registration is replaced
    assert len(DatasetCatalog.get(name)) == 4 and MetadataCatalog.get(name).sem_seg_root == str(root / "masks")
    assert MetadataCatalog.get(name).ignore_label == 255
    desc.write_text("format: folder\nimages: images\nlabel: masks\n")
    with pytest.raises(ValueError, match="unknown: \\['label'\\]"):
        parse_dataset_name(name)


def test_malformed_folders(tmp_path, registered):
    root = make_folder(tmp_path / "no_classes")
    (root / "classes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="class-name file"):
        registered(f"folder:{root}")

    root = make_folder(tmp_path / "orphan")
    (root / "images" / "a" / "img1.jpg").unlink()
    registered(f"folder:{root}")
    with pytest.raises(ValueError, match="img1.png.*has no image"):
        DatasetCatalog.get(f"folder:{root}")

    root = make_folder(tmp_path / "beyond")
    label = np.asarray(Image.open(root / "labels" / "b" / "img2.png")).copy()
    label[0, 0] = 3  # 3 classes: values 0..2 and 255 only
    Image.fromarray(label).save(root / "labels" / "b" / "img2.png")
    registered(f"folder:{root}")
    with pytest.raises(ValueError, match="img2.png.*values \\[3\\] beyond the 3 classes"):
        DatasetCatalog.get(f"folder:{root}")

    with pytest.raises(ValueError, match="not of the forms"):
        registered("folder:")


def test_predictor_vocabulary_from_a_folder_dataset(tmp_path, registered):
    from ovseg import Predictor

    root = make_folder(tmp_path / "data", n=1)
    name = f"folder:{root}"
    p = Predictor(tiny_mask_cfg(), vocabulary=name)
    registered(name)  # for the cleanup
    assert p.vocabulary.names == ["sky", "grass", "house"] and p.vocabulary.classes[1] == ("grass", "lawn")
    assert not p.model.is_thing.any()  # a folder dataset is all stuff
    p.set_vocabulary(["sky", "grass|lawn", "house"])  # the same classes as a list: things, as any user list
    assert p.model.is_thing.all()


def make_coco(root: Path, panoptic: bool, n: int = 3) -> Path:
    """COCO panoptic (PNGs in <json stem>/) or instances JSON over images/; two things (ids 5, 7), one stuff (9)."""
    from pycocotools import mask as mask_utils

    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(3)
    cats = [{"id": 5, "name": "cat", "isthing": 1}, {"id": 7, "name": "dog", "isthing": 1},
            {"id": 9, "name": "sky", "isthing": 0}]
    images, anns = [], []
    if panoptic:
        (root / "pan").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3)).astype(np.uint8)).save(root / "images" / f"p{i}.jpg")
        images.append({"id": 10 + i, "file_name": f"p{i}.jpg", "height": 40, "width": 56})
        seg = np.zeros((40, 56), np.int64)
        seg[:20] = 1  # sky
        seg[20:, :28] = 2  # cat
        seg[20:, 30:] = 3  # dog
        if panoptic:
            ids = {1: 9, 2: 5, 3: 7}
            rgb = np.stack([seg % 256, seg // 256 % 256, seg // 65536], -1).astype(np.uint8)
            Image.fromarray(rgb).save(root / "pan" / f"p{i}.png")
            anns.append({"image_id": 10 + i, "file_name": f"p{i}.png", "segments_info": [
                {"id": k, "category_id": c, "iscrowd": 0, "area": int((seg == k).sum())} for k, c in ids.items()]})
        else:
            for k, c in ((2, 5), (3, 7)):
                rle = mask_utils.encode(np.asfortranarray((seg == k).astype(np.uint8)))
                ys, xs = np.nonzero(seg == k)
                anns.append({"id": len(anns) + 1, "image_id": 10 + i, "category_id": c, "iscrowd": 0,
                             "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                             "area": int((seg == k).sum()),
                             "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]})
    path = root / ("pan.json" if panoptic else "instances.json")
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def test_coco_panoptic_and_instances(tmp_path, registered):
    pan = make_coco(tmp_path / "p", panoptic=True)
    registered(f"coco:{pan}")
    meta = MetadataCatalog.get(f"coco:{pan}")
    assert meta.evaluator_type == "coco_panoptic_seg" and meta.stuff_classes == ["cat", "dog", "sky"]
    assert meta.thing_dataset_id_to_contiguous_id == {5: 0, 7: 1}
    assert meta.stuff_dataset_id_to_contiguous_id == {5: 0, 7: 1, 9: 2}
    records = DatasetCatalog.get(f"coco:{pan}")
    data = json.loads(pan.read_text())
    assert len(records) == len(data["annotations"])
    for r, ann in zip(records, data["annotations"]):
        assert r["file_name"] == str(tmp_path / "p" / "images" / ann["file_name"].replace(".png", ".jpg"))
        assert r["pan_seg_file_name"] == str(tmp_path / "p" / "pan" / ann["file_name"])
        assert [(s["category_id"], s["isthing"]) for s in r["segments_info"]] == [(2, False), (0, True), (1, True)]

    inst = make_coco(tmp_path / "i", panoptic=False)
    registered(f"coco:{inst}")
    meta = MetadataCatalog.get(f"coco:{inst}")
    assert meta.evaluator_type == "coco" and meta.thing_classes == ["cat", "dog", "sky"]
    records = DatasetCatalog.get(f"coco:{inst}")
    assert [[o["category_id"] for o in r["annotations"]] for r in records] == [[0, 1]] * 3

    (tmp_path / "p" / "pan" / "p1.png").unlink()
    with pytest.raises(FileNotFoundError, match="pan_seg_file_name.*p1.png"):
        DatasetCatalog.get(f"coco:{pan}")


def confusion_miou(pred_by_file, gt_files, num_classes: int, ignore: int = 255) -> float:
    """mIoU (in %) over the classes present in the ground truth, from a confusion matrix built here."""
    conf = np.zeros((num_classes, num_classes), np.int64)
    for f in gt_files:
        gt = np.asarray(Image.open(f)).astype(np.int64)
        pred = pred_by_file[f]
        keep = gt != ignore
        conf += np.bincount(gt[keep] * num_classes + pred[keep], minlength=num_classes ** 2).reshape(conf.shape)
    tp, gt_n, pred_n = np.diag(conf), conf.sum(1), conf.sum(0)
    present = gt_n > 0
    return float(100 * np.mean(tp[present] / (gt_n + pred_n - tp)[present]))


def _train_net(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "train_net.py", *args, "OUTPUT_DIR", str(tmp_path / "out"),
                           "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = glob.glob(str(tmp_path / "out" / "inference" / "**" / "sem_seg_evaluation.pth"), recursive=True)
    assert len(found) == 1, found
    return torch.load(found[0], weights_only=False)


def _predictions(cfg, weights, name, registered):
    """Predictions of the Predictor (which registers the config's dataset names itself) on a dataset's images."""
    from ovseg import Predictor

    p = Predictor(cfg, weights=weights, device="cpu")
    assert name in DatasetCatalog.list()
    registered(name)  # for the cleanup
    return {r["sem_seg_file_name"]: p(r["file_name"]).sem_seg.numpy() for r in DatasetCatalog.get(name)}


@pytest.mark.slow
def test_folder_eval_only_dense_miou_matches_confusion_matrix(tmp_path, tiny_clip, registered):
    root = make_folder(tmp_path / "data")
    weights = tmp_path / "tiny_clip.pt"
    torch.save(tiny_clip(seed=2).state_dict(), weights)
    name = f"folder:{root}"
    opts = ["MODEL.CLIP.MODEL_NAME", "ovseg-tiny-ViT-16", "MODEL.CLIP.PRETRAINED", str(weights),
            "MODEL.TEXT.TEMPLATES", "single", "INPUT.MIN_SIZE_TEST", "48", "DATASETS.TEST", f"('{name}',)"]
    res = _train_net(["--config-file", "configs/clip_dense_vitb16.yaml", "--eval-only", *opts], tmp_path)

    cfg = tiny_cfg()
    cfg.merge_from_file(str(ROOT / "configs" / "clip_dense_vitb16.yaml"))
    cfg.merge_from_list(opts)
    preds = _predictions(cfg, None, name, registered)
    assert res["mIoU"] == pytest.approx(confusion_miou(preds, sorted(preds), len(CLASSES)), abs=1e-6)


@pytest.mark.slow
def test_folder_trains_mask_segmentor_and_evaluates(tmp_path, registered):
    root = make_folder(tmp_path / "data", n=4)
    name = f"folder:{root}"
    cfg = tiny_mask_cfg()
    cfg.merge_from_list([
        "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", f"('{name}',)", "INPUT.DATASET_MAPPER_NAME",
        "mask_semantic", "INPUT.MIN_SIZE_TRAIN", "(48,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.CROP.ENABLED",
        "False", "INPUT.MIN_SIZE_TEST", "48", "INPUT.MAX_SIZE_TEST", "64", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "1000", "TEST.EVAL_PERIOD", "0",
        "MODEL.MASK_SEG.TEST.PANOPTIC_ON", "False", "MODEL.MASK_SEG.TEST.INSTANCE_ON", "False"])
    config = tmp_path / "tiny_mask.yaml"
    config.write_text(cfg.dump())
    res = _train_net(["--config-file", str(config)], tmp_path)
    final = tmp_path / "out" / "model_final.pth"
    assert final.is_file()

    cfg.OUTPUT_DIR = str(tmp_path / "again")
    preds = _predictions(cfg, str(final), name, registered)
    assert res["mIoU"] == pytest.approx(confusion_miou(preds, sorted(preds), len(CLASSES)), abs=1e-6)


def test_coco_panoptic_metadata_round_trip_through_evaluator(tmp_path, registered):
    """The registered metadata drives the PQ evaluator: the ground truth itself scores 100; one cat segment
    labelled dog scores what the PQ rule written out here gives (cat: 2 TP 1 FN, dog: 3 TP 1 FP, sky: 3 TP)."""
    from ovseg.evaluation import build_benchmark_evaluator

    pan = make_coco(tmp_path / "p", panoptic=True)
    name = f"coco:{pan}"
    registered(name)
    records = DatasetCatalog.get(name)

    def run(swap: bool) -> float:
        evaluator = build_benchmark_evaluator(name, output_dir=str(tmp_path / "eval"), tasks=("panoptic_seg",))
        evaluator.reset()
        for i, r in enumerate(records):
            rgb = np.asarray(Image.open(r["pan_seg_file_name"])).astype(np.int64)
            seg = torch.as_tensor(rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2])
            info = [{"id": s["id"], "category_id": s["category_id"], "isthing": s["isthing"]}
                    for s in r["segments_info"]]
            if swap and i == 0:
                info[1]["category_id"] = 1  # the cat (contiguous 0) called dog
            evaluator.process([r], [{"panoptic_seg": (seg, info)}])
        return evaluator.evaluate()["panoptic_seg"]["PQ"]

    assert run(False) == pytest.approx(100.0)
    cat, dog, sky = 2 / (2 + 0.5 * 1), 3 / (3 + 0.5 * 1), 1.0
    assert run(True) == pytest.approx(100 * (cat + dog + sky) / 3, abs=1e-4)


@pytest.mark.slow
def test_coco_panoptic_trains_and_evaluates(tmp_path):
    pan = make_coco(tmp_path / "data", panoptic=True, n=4)
    name = f"coco:{pan}"
    cfg = tiny_mask_cfg()
    cfg.merge_from_list([
        "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", f"('{name}',)", "INPUT.DATASET_MAPPER_NAME",
        "mask_panoptic_lsj", "INPUT.IMAGE_SIZE", "48", "INPUT.MIN_SIZE_TEST", "40", "INPUT.MAX_SIZE_TEST", "64",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1000",
        "TEST.EVAL_PERIOD", "0", "MODEL.MASK_SEG.TEST.SEMANTIC_ON", "False", "MODEL.MASK_SEG.TEST.INSTANCE_ON",
        "False", "MODEL.MASK_SEG.TEST.PANOPTIC_ON", "True", "OUTPUT_DIR", str(tmp_path / "out"),
        "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu"])
    config = tmp_path / "tiny_mask.yaml"
    config.write_text(cfg.dump())
    proc = subprocess.run([sys.executable, "train_net.py", "--config-file", str(config)], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    assert "copypaste: PQ,SQ,RQ" in log and (tmp_path / "out" / "model_final.pth").is_file()
