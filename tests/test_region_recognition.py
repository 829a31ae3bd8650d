"""Region recognition: the evaluator on constructed scores, the model's region scores against brute force, and
`train_net.py --eval-only` on a miniature COCO-panoptic-format dataset."""
import json
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_panoptic
from detectron2.modeling import build_model
from PIL import Image

from ovseg.data.clipself_mapper import RegionRecognitionDatasetMapper
from ovseg.evaluation.region_recognition import RegionRecognitionEvaluator
from ovseg.modeling import pool_boxes
from tests.helpers import tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORIES = [  # COCO-style ids (not contiguous), things and stuff
    {"id": 1, "name": "cat", "isthing": 1},
    {"id": 3, "name": "sofa", "isthing": 1},
    {"id": 7, "name": "lamp", "isthing": 1},
    {"id": 20, "name": "wall", "isthing": 0},
    {"id": 21, "name": "floor", "isthing": 0},
]


def _scores_with_ranks(labels, ranks, num_classes, seed=0):
    """(K, C) scores where the true class of region i is the ranks[i]-th best (0 = top-1), no ties."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(labels), num_classes)
    for i, (y, r) in enumerate(zip(labels, ranks)):
        others = [c for c in range(num_classes) if c != y]
        order = [others[j] for j in torch.randperm(len(others), generator=g).tolist()]
        order.insert(r, y)  # best first
        for pos, c in enumerate(order):
            out[i, c] = num_classes - pos + 0.5 * torch.rand(1, generator=g).item() / num_classes
    return out


def test_evaluator_exact_accuracies():
    # classes 0, 1 things; 2 stuff. box ranks give top-1 per class 1/2, 1, 1/3; top-2 per class 1, 1, 2/3.
    labels = [0, 0, 1, 2, 2, 2]
    isthing = [True, True, True, False, False, False]
    box_ranks = [0, 1, 0, 0, 1, 2]
    mask_ranks = [0, 0, 2, 1, 1, 1]
    ev = RegionRecognitionEvaluator("x", distributed=False, topk=(1, 2))
    ev.reset()
    for part in (slice(0, 2), slice(2, 6)):  # two images
        ev.process([{"region_classes": torch.tensor(labels[part]), "region_isthing": torch.tensor(isthing[part])}],
                   [{"box_region_scores": _scores_with_ranks(labels[part], box_ranks[part], 3),
                     "mask_region_scores": _scores_with_ranks(labels[part], mask_ranks[part], 3)}])
    res = ev.evaluate()["region_recognition"]

    def pct(*fracs):
        return float(100 * sum(map(Fraction, fracs)) / len(fracs))

    assert res["box_top1"] == pytest.approx(pct("1/2", 1, "1/3"))
    assert res["box_top1_thing"] == pytest.approx(pct("1/2", 1))
    assert res["box_top1_stuff"] == pytest.approx(pct("1/3"))
    assert res["box_top2"] == pytest.approx(pct(1, 1, "2/3"))
    assert res["mask_top1"] == pytest.approx(pct(1, 0, 0))
    assert res["mask_top2_thing"] == pytest.approx(pct(1, 0))
    assert res["mask_top2_stuff"] == pytest.approx(pct(1))
    assert res["num_regions"] == 6


def test_evaluator_random_against_loops():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, 300)
    isthing = labels < 7
    ranks = rng.integers(0, 12, 300)
    scores = _scores_with_ranks(labels.tolist(), ranks.tolist(), 12)
    ev = RegionRecognitionEvaluator(distributed=False)
    ev.process([{"region_classes": torch.as_tensor(labels), "region_isthing": torch.as_tensor(isthing)}],
               [{"box_region_scores": scores, "mask_region_scores": -scores}])
    res = ev.evaluate()["region_recognition"]
    for k in (1, 5):
        for split, sel in (("", lambda c: True), ("_thing", lambda c: c < 7), ("_stuff", lambda c: c >= 7)):
            accs = []
            for c in range(12):
                if sel(c) and (labels == c).any():
                    top = [int(torch.argsort(scores[i], descending=True)[:k].eq(c).any())
                           for i in np.where(labels == c)[0]]
                    accs.append(sum(top) / len(top))
            assert res[f"box_top{k}{split}"] == pytest.approx(100 * sum(accs) / len(accs))


def test_evaluator_bad_inputs():
    ev = RegionRecognitionEvaluator(distributed=False)
    with pytest.raises(ValueError, match="region_classes"):
        ev.process([{}], [{}])
    with pytest.raises(ValueError, match="vocabulary"):
        ev.process([{"region_classes": torch.tensor([5]), "region_isthing": torch.tensor([True])}],
                   [{"box_region_scores": torch.zeros(1, 3), "mask_region_scores": torch.zeros(1, 3)}])


def _make_panoptic(root, n=3):
    """A miniature COCO panoptic dataset on disk: jpg images, panoptic PNGs (id = R + 256 G), JSON."""
    for d in ("images", "panoptic"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(n):
        h, w = 64, 96 + 16 * i
        img = rng.integers(0, 256, size=(4, 6, 3)).astype(np.uint8)
        Image.fromarray(img).resize((w, h), Image.NEAREST).save(root / "images" / f"{i:04d}.jpg")
        pan = np.zeros((h, w), np.int64)
        segs = []
        # stuff: two horizontal bands; things: rectangles on top, one of them tiny (below MIN_SIZE)
        rects = [(20, 0, 0, w, 32), (21, 0, 32, w, h), (1, 0, 8, 48, 40), (3, 48, 16, 80, 64), (7, 90, 2, 93, 5)]
        for k, (_, x0, y0, x1, y1) in enumerate(rects):
            sid = 1 + k + 300 * k  # ids > 255 exercise the G channel
            pan[y0:y1, x0:x1] = sid
        for k, (cat, *_) in enumerate(rects):
            sid = 1 + k + 300 * k
            ys, xs = np.nonzero(pan == sid)
            segs.append({"id": int(sid), "category_id": cat, "iscrowd": 0, "area": int(len(ys)),
                         "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]})
        rgb = np.stack([pan % 256, pan // 256 % 256, pan // 65536], -1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "panoptic" / f"{i:04d}.png")
        images.append({"id": i, "file_name": f"{i:04d}.jpg", "height": h, "width": w})
        anns.append({"image_id": i, "file_name": f"{i:04d}.png", "segments_info": segs})
    with open(root / "panoptic.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": CATEGORIES}, f)


def register_tiny_panoptic(name: str, root) -> None:
    """Register the miniature dataset like detectron2's COCO panoptic (contiguous ids over all classes)."""
    from pathlib import Path

    root = Path(root)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    things = [c for c in CATEGORIES if c["isthing"]]
    stuff = [c for c in CATEGORIES if not c["isthing"]]
    meta = {
        "thing_classes": [c["name"] for c in things],
        "stuff_classes": [c["name"] for c in CATEGORIES],
        "thing_dataset_id_to_contiguous_id": {c["id"]: CATEGORIES.index(c) for c in things},
        "stuff_dataset_id_to_contiguous_id": {c["id"]: CATEGORIES.index(c) for c in stuff},
    }
    register_coco_panoptic(name, meta, str(root / "images"), str(root / "panoptic"), str(root / "panoptic.json"))


def _cfg(tmp_path, **kw):
    opts = dict(MODEL__META_ARCHITECTURE="CLIPSelfDistiller", INPUT__TEST_DATASET_MAPPER_NAME="region_recognition",
                INPUT__REGION_RECOGNITION__SIZE=128,
                OUTPUT_DIR=str(tmp_path / "out"), DATALOADER__NUM_WORKERS=0)
    opts.update(kw)
    return tiny_cfg(**opts)


def test_mapper_regions(tmp_path):
    _make_panoptic(tmp_path / "pan", n=1)
    register_tiny_panoptic("_ovseg_tiny_pan_mapper", tmp_path / "pan")
    d = DatasetCatalog.get("_ovseg_tiny_pan_mapper")[0]
    out = RegionRecognitionDatasetMapper(_cfg(tmp_path), False)(d)
    assert out["image"].shape == (3, 85, 128)  # 64 x 96 -> longest side 128
    assert out["region_classes"].tolist() == [3, 4, 0, 1]  # the 3x3 lamp is dropped (MIN_SIZE 8)
    assert out["region_isthing"].tolist() == [False, False, True, True]
    s = 128 / 96
    # tight boxes of the visible parts: the cat covers band pixels, the sofa overlaps the cat
    expected = torch.tensor([[0, 0, 96, 32], [0, 32, 96, 64], [0, 8, 48, 40], [48, 16, 80, 64]]) * s
    torch.testing.assert_close(out["region_boxes"], expected.float(), atol=0.51 * s, rtol=0)
    assert out["region_masks"].shape == (4, 85, 128)
    assert out["region_masks"].sum((1, 2)).gt(0).all()
    with pytest.raises(ValueError, match="panoptic"):
        RegionRecognitionDatasetMapper(_cfg(tmp_path), False)({"file_name": d["file_name"]})


def test_model_region_scores_brute_force():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(MODEL__META_ARCHITECTURE="CLIPSelfDistiller", MODEL__TEXT__VOCABULARY="cat,sofa,wall"))
    model.eval()
    image = torch.randint(0, 256, (3, 48, 80)).float()
    masks = torch.zeros(2, 48, 80, dtype=torch.bool)
    masks[0, 0:16, 16:48] = True  # patch-aligned masks: exactly cells (0,1), (0,2)
    masks[1, 16:48, 0:16] = True
    masks[1, 32:48, 64:80] = True
    boxes = torch.tensor([[16.0, 0, 48, 16], [3.5, 7.25, 70.0, 40.0]])
    with torch.no_grad():
        out = model([{"image": image, "region_boxes": boxes, "region_masks": masks}])[0]
        dense = model.backbone(((image - model.pixel_mean) / model.pixel_std)[None])["clip_dense"][0]  # (D, 3, 5)
        text = model.text_classifier("cat,sofa,wall")
        cells = [[(0, 1), (0, 2)], [(1, 0), (2, 0), (2, 4)]]
        ref_mask = torch.stack([F.normalize(torch.stack([dense[:, i, j] for i, j in c]).mean(0), dim=0) for c in cells])
        ref_box = F.normalize(pool_boxes(dense[None], [boxes], 16), dim=-1)
    torch.testing.assert_close(out["mask_region_scores"], ref_mask @ text.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["box_region_scores"], ref_box @ text.T, atol=1e-5, rtol=1e-5)
    # box 0 covers exactly cells (0,1), (0,2): RoIAlign's 2x2 samples per cell average them too
    torch.testing.assert_close(out["box_region_scores"][0], out["mask_region_scores"][0], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_eval_only_subprocess(tmp_path, tiny_clip):
    """`train_net.py --eval-only` (in a subprocess) on the miniature dataset vs the model run here."""
    _make_panoptic(tmp_path / "pan")
    weights = tmp_path / "tiny.pt"
    torch.save(tiny_clip("ovseg-tiny-ViT-16", seed=4).state_dict(), weights)
    name = "_ovseg_tiny_pan_eval"
    cfg = _cfg(tmp_path, MODEL__CLIP__PRETRAINED=str(weights))
    cfg.DATASETS.TEST = (name,)
    (tmp_path / "cfg.yaml").write_text(cfg.dump())
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "from tests.test_region_recognition import register_tiny_panoptic\n"
        f"register_tiny_panoptic({name!r}, {str(tmp_path / 'pan')!r})\n"
        "from ovseg import engine as train_net\n"
        "args = train_net.default_argument_parser().parse_args(sys.argv[1:])\n"
        "train_net.launch(train_net.main, 1, args=(args,))\n"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(driver), "--config-file", str(tmp_path / "cfg.yaml"), "--eval-only"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "out" / "inference" / name / "region_recognition.json") as f:
        got = json.load(f)

    # independent: the same model and mapper in this process, accuracies by plain loops
    register_tiny_panoptic(name, tmp_path / "pan")
    model = build_model(cfg).eval()
    model.set_vocabulary(name)
    mapper = RegionRecognitionDatasetMapper(cfg, False)
    records = []
    with torch.no_grad():
        for d in DatasetCatalog.get(name):
            inp = mapper(d)
            out = model([inp])[0]
            for i, y in enumerate(inp["region_classes"].tolist()):
                records.append((y, bool(inp["region_isthing"][i]), out["box_region_scores"][i].argsort(descending=True),
                                out["mask_region_scores"][i].argsort(descending=True)))
    assert got["num_regions"] == len(records) == 12
    for p, col in (("box", 2), ("mask", 3)):
        for k in (1, 5):
            for split, keep in (("", lambda t: True), ("_thing", lambda t: t), ("_stuff", lambda t: not t)):
                per_class = {}
                for r in records:
                    if keep(r[1]):
                        per_class.setdefault(r[0], []).append(int(r[0] in r[col][:k].tolist()))
                ref = 100 * np.mean([np.mean(v) for v in per_class.values()])
                assert got[f"{p}_top{k}{split}"] == pytest.approx(ref, abs=1e-9), (p, k, split)
