"""Panoptic quality through ovseg's backend choice and evaluator, against a brute-force PQ."""
import json

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from ovseg.data.image_io import id2rgb, rgb2id
from ovseg.evaluation import OVSegPanopticEvaluator, format_pq_table, panoptic_backend, pq_compute

CATEGORIES = [{"id": 1, "name": "blob", "isthing": 1}, {"id": 2, "name": "ground", "isthing": 0}]


def _maps():
    """GT and prediction as (segment-id map, {segment id: category id})."""
    gt = np.zeros((24, 24), np.int64)
    gt[:12] = 3  # stuff "ground"
    gt[14:22, 2:10] = 1  # blob instance A
    gt[14:22, 14:22] = 2  # blob instance B
    gt[12:14] = 3
    gt[22:] = 3
    gt[14:22, 10:14] = 3
    gt[14:22, :2] = 3
    gt[14:22, 22:] = 3
    pred = gt.copy()
    pred[14:22, 14:22] = 3  # B missed (false negative), absorbed by ground
    pred[14:22, 2:8] = 1  # A slightly too small: IoU 48/64 = 0.75
    pred[14:22, 8:10] = 3
    pred[2:6, 2:6] = 5  # a spurious blob (false positive)
    return (gt, {1: 1, 2: 1, 3: 2}), (pred, {1: 1, 3: 2, 5: 1})


def brute_force_pq(gt, pred):
    """Per-category matching by IoU > 0.5, PQ = sum IoU / (TP + FP/2 + FN/2), averaged over categories."""
    (g, gcat), (p, pcat) = gt, pred
    per_class = {}
    for cat in {1, 2}:
        gsegs = [s for s, c in gcat.items() if c == cat]
        psegs = [s for s, c in pcat.items() if c == cat]
        ious, matched_p = [], set()
        for gs in gsegs:
            for ps in psegs:
                inter = np.sum((g == gs) & (p == ps))
                union = np.sum((g == gs) | (p == ps))
                if inter / union > 0.5:
                    ious.append(inter / union)
                    matched_p.add(ps)
        tp, fn, fp = len(ious), len(gsegs) - len(ious), len(psegs) - len(matched_p)
        per_class[cat] = sum(ious) / (tp + 0.5 * fp + 0.5 * fn)
    return per_class


def _write(folder, name, seg_map, cats, image_id):
    folder.mkdir(exist_ok=True)
    Image.fromarray(id2rgb(seg_map)).save(folder / f"{name}.png")
    segs = [{"id": int(s), "category_id": c, "iscrowd": 0, "area": int(np.sum(seg_map == s)),
             "bbox": [0, 0, 1, 1]} for s, c in cats.items()]
    return {"image_id": image_id, "file_name": f"{name}.png", "segments_info": segs}


def _write_case(tmp_path):
    gt, pred = _maps()
    images = [{"id": 7, "file_name": "img.jpg", "height": 24, "width": 24}]
    gt_ann = _write(tmp_path / "gt", "img", *gt, 7)
    pred_ann = _write(tmp_path / "pred", "img", *pred, 7)
    for name, ann in (("gt.json", gt_ann), ("pred.json", pred_ann)):
        (tmp_path / name).write_text(json.dumps({"images": images, "annotations": [ann], "categories": CATEGORIES}))
    return gt, pred


def test_id_colour_round_trip():
    ids = np.array([[0, 1, 256], [65536 + 3, 2**24 - 1, 1000]])
    assert np.array_equal(rgb2id(id2rgb(ids)), ids)


def test_pq_compute_matches_brute_force(tmp_path):
    gt, pred = _write_case(tmp_path)
    res = pq_compute(str(tmp_path / "gt.json"), str(tmp_path / "pred.json"), str(tmp_path / "gt"),
                     str(tmp_path / "pred"))
    ref = brute_force_pq(gt, pred)
    assert res["Things"]["pq"] == pytest.approx(ref[1], abs=1e-6)
    assert res["Stuff"]["pq"] == pytest.approx(ref[2], abs=1e-6)
    assert res["All"]["pq"] == pytest.approx((ref[1] + ref[2]) / 2, abs=1e-6)
    assert 0 < ref[1] < 1  # the case has TP, FP and FN


def test_backends_agree(tmp_path):
    _write_case(tmp_path)
    args = [str(tmp_path / "gt.json"), str(tmp_path / "pred.json"), str(tmp_path / "gt"), str(tmp_path / "pred")]
    try:
        import panopticapi.evaluation  # noqa: F401
    except ImportError:
        assert panoptic_backend() == "hotcoco"
        pytest.skip("panopticapi not installed: only hotcoco can be checked here")
    a, b = pq_compute(*args, backend="panopticapi"), pq_compute(*args, backend="hotcoco")
    for group in ("All", "Things", "Stuff"):
        assert a[group]["pq"] == pytest.approx(b[group]["pq"], abs=1e-9)


def _table_rows(table: str) -> dict:
    """{row name: cells} of a pipe table, header and separator dropped."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()]
    return {r[0]: r[1:] for r in rows[2:]}


def test_pq_table_rows():
    res = {g: {"pq": 0.1 * i + 0.01234, "sq": 0.5 + 0.01 * i, "rq": 0.25, "n": 3 + i}
           for i, g in enumerate(("All", "Things", "Stuff"))}
    rows = _table_rows(format_pq_table(res))
    assert sorted(rows) == ["All", "Stuff", "Things"]
    for g, cells in rows.items():
        assert [float(c) for c in cells[:3]] == [round(100 * res[g][k], 3) for k in ("pq", "sq", "rq")]
        assert int(cells[3]) == res[g]["n"]


def test_panoptic_evaluator_on_model_style_outputs(tmp_path, caplog):
    """The evaluator (used by train_net for panoptic datasets) scores a prediction given as model output."""
    gt, pred = _write_case(tmp_path)
    name = "_ovseg_test_pq_dataset"
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(
        panoptic_json=str(tmp_path / "gt.json"), panoptic_root=str(tmp_path / "gt"), evaluator_type="coco_panoptic_seg",
        thing_dataset_id_to_contiguous_id={1: 0}, stuff_dataset_id_to_contiguous_id={1: 0, 2: 1},
        stuff_classes=["blob", "ground"], thing_classes=["blob"], label_divisor=1000,
    )
    ev = OVSegPanopticEvaluator(name, output_dir=str(tmp_path / "out"))
    ev.reset()
    seg, cats = pred
    info = [{"id": s, "category_id": 0 if c == 1 else 1, "isthing": c == 1} for s, c in cats.items()]
    ev.process([{"image_id": 7, "file_name": "img.jpg"}], [{"panoptic_seg": (torch.from_numpy(seg), info)}])
    with caplog.at_level("INFO", logger="ovseg.evaluation.panoptic_quality"):
        res = ev.evaluate()["panoptic_seg"]
    ref = brute_force_pq(gt, pred)
    # the logged table shows the returned numbers
    rows = _table_rows(caplog.text.split("Panoptic Evaluation Results:\n", 1)[1])
    assert float(rows["Things"][0]) == pytest.approx(res["PQ_th"], abs=1e-3)
    assert res["PQ_th"] == pytest.approx(100 * ref[1], abs=1e-4)
    assert res["PQ_st"] == pytest.approx(100 * ref[2], abs=1e-4)
