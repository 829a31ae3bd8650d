"""CLIPSelf data: grid regions, proposals, teacher crops, image folders (independent brute-force checks)."""
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog
from PIL import Image

from ovseg.data.clipself_mapper import (
    CLIPSelfDatasetMapper,
    crop_regions,
    filter_proposals,
    grid_boxes,
    grid_choices,
    register_image_folders,
)
from tests.helpers import tiny_cfg


def _save_image(path, h, w, seed=0):
    img = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3)).astype(np.uint8)
    Image.fromarray(img).save(path)
    return img


def _mapper(**overrides):
    opts = {"INPUT__CLIPSELF__CROP_SIZE": 16}
    opts.update(overrides)
    return CLIPSelfDatasetMapper(tiny_cfg(**opts), True)


def test_grid_choices_bounded():
    choices = grid_choices(6, 2.0)
    brute = [(m, n) for m in range(1, 7) for n in range(1, 7) if 2 * min(m, n) >= max(m, n)]
    assert sorted(choices) == sorted(brute)
    assert (1, 1) in choices and (6, 6) in choices and (3, 6) in choices and (1, 3) not in choices
    with pytest.raises(ValueError, match="GRID_MAX_SPLIT"):
        grid_choices(0, 2.0)


@pytest.mark.parametrize("h,w,m,n", [(70, 100, 3, 6), (48, 48, 1, 1), (37, 53, 5, 4)])
def test_grid_boxes_tile_image_exactly(h, w, m, n):
    boxes = grid_boxes(h, w, m, n).double()
    assert boxes.shape == (m * n, 4)
    assert boxes[:, 0].min() == 0 and boxes[:, 1].min() == 0
    assert boxes[:, 2].max() == w and boxes[:, 3].max() == h
    # every sample point of a fine lattice (never on a cell edge) lies in exactly one cell
    ys = (torch.arange(4 * h, dtype=torch.float64) + 0.37) / 4
    xs = (torch.arange(4 * w, dtype=torch.float64) + 0.41) / 4
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    count = torch.zeros_like(yy)
    for x0, y0, x1, y1 in boxes.tolist():
        count += ((xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)).double()
    assert torch.all(count == 1)
    torch.testing.assert_close((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
                               torch.full((m * n,), h * w / (m * n), dtype=torch.float64), rtol=1e-6, atol=0)


def test_filter_proposals_drops_outside_and_small():
    boxes = torch.tensor([
        [10, 10, 30, 30],    # kept as is
        [-5, -5, 20, 20],    # clipped to [0, 0, 20, 20]
        [200, 10, 220, 30],  # entirely right of the image
        [10, -40, 30, -10],  # entirely above
        [5, 5, 9, 9],        # 4x4 < 8x8
        [0, 0, 100, 50],     # whole image, kept (area 5000 <= 90^2)
    ], dtype=torch.float32)
    kept = filter_proposals(boxes, 50, 100, min_size=8, max_size=90)
    assert kept.tolist() == [[10, 10, 30, 30], [0, 0, 20, 20], [0, 0, 100, 50]]
    assert filter_proposals(boxes, 50, 100, min_size=8, max_size=20).tolist() == [[10, 10, 30, 30],
                                                                                   [0, 0, 20, 20]]


def test_crops_match_boxes():
    img = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    boxes = torch.tensor([[4, 6, 20, 22], [10, 2, 42, 34]], dtype=torch.float32)  # 16x16 and 32x32
    crops = crop_regions(img, boxes, 16)
    assert crops.shape == (2, 3, 16, 16) and crops.dtype == torch.uint8
    assert torch.equal(crops[0], img[:, 6:22, 4:20])  # same size: the pixels themselves
    ref = F.avg_pool2d(img[None, :, 2:34, 10:42].float(), 2)[0]  # twice the size: 2x2 means
    assert torch.equal(crops[1], ref.round().to(torch.uint8))
    assert crop_regions(img, torch.zeros(0, 4), 16).shape == (0, 3, 16, 16)


def test_patch_mapper_regions_resize_and_crops(tmp_path):
    _save_image(tmp_path / "a.png", 48, 80)
    full = torch.as_tensor(np.array(Image.open(tmp_path / "a.png"))).permute(2, 0, 1)
    mapper = _mapper(INPUT__CLIPSELF__GRID_MAX_SPLIT=3, INPUT__CLIPSELF__SIZES=[40])
    random.seed(0)
    for _ in range(10):
        out = mapper({"file_name": str(tmp_path / "a.png"), "image_id": 0, "annotations": [1]})
        assert out["image"].shape == (3, 24, 40) and "annotations" not in out
        boxes = out["region_boxes"] * 2  # back to original pixels (80 -> 40)
        # at most 9 cells <= MAX_REGIONS: the regions are one whole grid, covering the image once
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum()
        assert area.item() == pytest.approx(48 * 80)
        # (row-major, not shuffled: only caps above MAX_REGIONS draw a subset)
        assert any(boxes.shape == (m * n, 4) and torch.allclose(boxes, grid_boxes(48, 80, m, n), atol=1e-4)
                   for m, n in grid_choices(3, 2.0))
        # teacher crops are cut from the full-resolution image
        assert torch.equal(out["crops"], crop_regions(full, boxes, 16))


def test_patch_mapper_caps_regions_and_multiscale(tmp_path):
    _save_image(tmp_path / "a.png", 60, 60)
    mapper = _mapper(INPUT__CLIPSELF__MAX_REGIONS=5, INPUT__CLIPSELF__SIZES=[32, 48])
    random.seed(1)
    sizes = set()
    for _ in range(12):
        out = mapper({"file_name": str(tmp_path / "a.png"), "image_id": 0})
        assert 1 <= len(out["region_boxes"]) <= 5 and len(out["crops"]) == len(out["region_boxes"])
        sizes.add(out["image"].shape[-1])
    assert sizes == {32, 48}


def test_proposal_mapper_by_id_and_by_file_name(tmp_path):
    _save_image(tmp_path / "a.png", 50, 100)
    proposals = {
        "images": [{"id": 7, "file_name": "a.png"}],
        "annotations": [
            {"image_id": 7, "bbox": [10, 10, 20, 20]},
            {"image_id": 7, "bbox": [90, 40, 30, 30]},   # clipped to [90, 40, 100, 50]: 10x10 kept
            {"image_id": 7, "bbox": [150, 0, 20, 20]},   # outside
            {"image_id": 7, "bbox": [0, 0, 3, 3]},       # too small
        ],
    }
    (tmp_path / "props.json").write_text(json.dumps(proposals))
    mapper = _mapper(INPUT__CLIPSELF__REGION_SOURCE="proposals", INPUT__CLIPSELF__PROPOSAL_FILE=str(tmp_path /
                     "props.json"), INPUT__CLIPSELF__SIZES=[100], INPUT__CLIPSELF__PROPOSAL_MIN_SIZE=8.0)
    for d in ({"file_name": str(tmp_path / "a.png"), "image_id": 7},
              {"file_name": str(tmp_path / "a.png"), "image_id": 0}):  # image folder id: matched by name
        out = mapper(d)
        assert sorted(out["region_boxes"].tolist()) == [[10, 10, 30, 30], [90, 40, 100, 50]]
    assert mapper.proposals[7].shape == (4, 4)


def test_proposal_crop_scale(tmp_path):
    img = _save_image(tmp_path / "a.png", 64, 64)
    (tmp_path / "p.json").write_text(json.dumps({"annotations": [{"image_id": 0, "bbox": [24, 24, 16, 16]}]}))
    mapper = _mapper(INPUT__CLIPSELF__REGION_SOURCE="proposals", INPUT__CLIPSELF__PROPOSAL_FILE=str(
        tmp_path / "p.json"), INPUT__CLIPSELF__CROP_SCALE=1.5, INPUT__CLIPSELF__CROP_SIZE=24)
    out = mapper({"file_name": str(tmp_path / "a.png"), "image_id": 0})
    # the teacher sees the 24x24 neighbourhood (1.5x), the student pools the box itself
    assert torch.equal(out["crops"][0], torch.as_tensor(img[20:44, 20:44]).permute(2, 0, 1))


def test_mapper_bad_config(tmp_path):
    with pytest.raises(ValueError, match="REGION_SOURCE"):
        _mapper(INPUT__CLIPSELF__REGION_SOURCE="boxes")
    with pytest.raises(ValueError, match="PROPOSAL_FILE"):
        _mapper(INPUT__CLIPSELF__REGION_SOURCE="proposals")
    with pytest.raises(FileNotFoundError):
        _mapper(INPUT__CLIPSELF__REGION_SOURCE="proposals", INPUT__CLIPSELF__PROPOSAL_FILE=str(tmp_path / "x.json"))
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="annotations"):
        _mapper(INPUT__CLIPSELF__REGION_SOURCE="proposals", INPUT__CLIPSELF__PROPOSAL_FILE=str(tmp_path / "bad.json"))


def test_image_folder_dataset(tmp_path):
    (tmp_path / "sub").mkdir()
    _save_image(tmp_path / "b.jpg", 20, 30)
    _save_image(tmp_path / "sub" / "a.png", 10, 12)
    (tmp_path / "notes.txt").write_text("not an image")
    name = str(tmp_path)
    register_image_folders([name, "coco_2017_train"])
    dicts = DatasetCatalog.get(name)
    assert [(d["height"], d["width"]) for d in dicts] == [(20, 30), (10, 12)]
    assert len({d["image_id"] for d in dicts}) == 2
    (tmp_path / "empty").mkdir()
    register_image_folders([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="no images"):
        DatasetCatalog.get(str(tmp_path / "empty"))


@pytest.mark.parametrize("name", ["clipself_eva02_b16_coco_patches", "clipself_eva02_b16_coco_proposals",
                                  "clipself_vitb16_coco_patches"])
def test_configs_load(name):
    from ovseg.config import get_ovseg_cfg

    cfg = get_ovseg_cfg()
    cfg.merge_from_file(f"configs/clipself/{name}.yaml")
    assert cfg.MODEL.META_ARCHITECTURE == "CLIPSelfDistiller" and cfg.MODEL.CLIP.UNLOCK_LAST_BLOCKS == 12
    assert cfg.SOLVER.BASE_LR == 1e-5 and cfg.SOLVER.WEIGHT_DECAY == 0.1 and cfg.INPUT.CLIPSELF.SIZES == [1024]
    assert cfg.SOLVER.MAX_ITER * cfg.SOLVER.IMS_PER_BATCH == pytest.approx(6 * 118287, rel=1e-3)
    if cfg.INPUT.CLIPSELF.REGION_SOURCE == "patches":
        mapper = CLIPSelfDatasetMapper(cfg, True)
        assert mapper.max_regions == 20 and max(max(c) for c in mapper.choices) == 6
