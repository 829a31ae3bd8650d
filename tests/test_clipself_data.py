"""CLIPSelf data: grid regions, proposals, teacher crops, image folders (independent brute-force checks), and the
authors' data pipeline (github.com/wusize/CLIPSelf src/training/data.py, src/open_clip/transform.py) written out
with PIL / torchvision."""
import itertools
import json
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from detectron2.data import DatasetCatalog
from PIL import Image
from torchvision.transforms import InterpolationMode

from ovseg.data.clipself_mapper import (
    CLIPSelfDatasetMapper,
    crop_regions,
    grid_boxes,
    grid_choices,
    letterbox,
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


def _resize_max_size(pil, size):
    """open_clip's `ResizeMaxSize` (CLIPSelf's teacher transform) before ToTensor: longest side to `size`
    (bicubic), centred on black."""
    w, h = pil.size
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    pil = TF.resize(pil, [nh, nw], InterpolationMode.BICUBIC)
    pw, ph = size - nw, size - nh
    pil = TF.pad(pil, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
    return torch.as_tensor(np.array(pil)).permute(2, 0, 1)


def _resize_longest(pil, size):
    """CLIPSelf's student transform (`ResizeLongest`) and its box scale (`get_scale` of the padded square)."""
    w, h = pil.size
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    pil = TF.pad(TF.resize(pil, [nh, nw], InterpolationMode.BICUBIC), [0, 0, size - nw, size - nh], fill=0)
    return torch.as_tensor(np.array(pil)).permute(2, 0, 1), min(size / h, size / w)


def test_crops_follow_clipself_resize_max_size():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 60, 3)).astype(np.uint8)
    xy = rng.uniform(0, 30, (12, 2))
    boxes = torch.tensor(np.concatenate([xy, xy + rng.uniform(1, 30, (12, 2))], 1), dtype=torch.float32)
    boxes[0] = torch.tensor([4.5, 6.5, 20.5, 9.5])  # halves: PIL rounds them (to even)
    crops = crop_regions(img, boxes, 16)
    assert crops.shape == (12, 3, 16, 16) and crops.dtype == torch.uint8
    pil = Image.fromarray(img)
    for crop, box in zip(crops, boxes.tolist()):
        assert torch.equal(crop, _resize_max_size(pil.crop(tuple(box)), 16))  # PIL crops at a fractional box
    assert crop_regions(img, torch.zeros(0, 4), 16).shape == (0, 3, 16, 16)


@pytest.mark.parametrize("h,w,size", [(48, 80, 64), (70, 33, 40), (30, 30, 50)])
def test_student_input_follows_clipself_resize_longest(h, w, size):
    img = np.random.default_rng(h).integers(0, 256, (h, w, 3)).astype(np.uint8)
    ours, scale = letterbox(img, size)
    ref, ref_scale = _resize_longest(Image.fromarray(img), size)
    assert torch.equal(torch.as_tensor(ours).permute(2, 0, 1), ref) and scale == ref_scale


def _clipself_proposals(img, anns, max_anns, min_size, max_size, crop_size):
    """CLIPSelf's `ProposalDistillDataset.__getitem__`, written out: shuffle, take max_anns, drop by raw area,
    crop 1.5x (clipped), fallback to the top-left quarter."""
    pil = Image.fromarray(img)
    img_w, img_h = pil.size
    indices = list(range(len(anns)))
    random.shuffle(indices)
    boxes, crops = [], []
    for i in indices[:max_anns]:
        x, y, w, h = anns[i]
        if w * h < min_size ** 2 or w * h > max_size ** 2:
            continue
        cx, cy = x + w * 0.5, y + h * 0.5
        x0, y0, x1, y1 = max(cx - w * 0.75, 0), max(cy - h * 0.75, 0), min(cx + w * 0.75, img_w), \
            min(cy + h * 0.75, img_h)
        crops.append(_resize_max_size(pil.crop((x0, y0, x1, y1)), crop_size))
        boxes.append([x, y, x + w, y + h])
    if not boxes:
        boxes.append([0, 0, img_w / 4, img_h / 4])
        crops.append(_resize_max_size(pil.crop((0, 0, img_w // 4, img_h // 4)), crop_size))
    return torch.tensor(boxes, dtype=torch.float32), torch.stack(crops)


def test_proposals_follow_clipself(tmp_path):
    rng = np.random.default_rng(3)
    img = _save_image(tmp_path / "a.png", 50, 70, seed=3)
    anns = {1: [[float(v) for v in (rng.uniform(0, 60), rng.uniform(0, 40), *rng.uniform(1, 40, 2))]
                for _ in range(30)],
            2: [[0.0, 0.0, 3.0, 3.0], [60.0, 40.0, 2.0, 2.5]],  # all too small: the fallback box
            3: []}  # listed in "images", no proposal: the fallback box
    data = {"images": [{"id": k, "file_name": f"{k}.png"} for k in anns],
            "annotations": [{"image_id": k, "bbox": b} for k, v in anns.items() for b in v]}
    (tmp_path / "p.json").write_text(json.dumps(data))
    mapper = _mapper(INPUT__CLIPSELF__REGION_SOURCE="proposals", INPUT__CLIPSELF__PROPOSAL_FILE=str(
        tmp_path / "p.json"), INPUT__CLIPSELF__CROP_SCALE=1.5, INPUT__CLIPSELF__CROP_SIZE=24,
        INPUT__CLIPSELF__MAX_REGIONS=12, INPUT__CLIPSELF__PROPOSAL_MIN_SIZE=8.0, INPUT__CLIPSELF__SIZES=[64])
    for k, seed in itertools.product(anns, range(3)):
        random.seed(seed)
        ref_boxes, ref_crops = _clipself_proposals(img, anns[k], 12, 8.0, 1024.0, 24)
        random.seed(seed)
        out = mapper({"file_name": str(tmp_path / "a.png"), "image_id": k})
        torch.testing.assert_close(out["region_boxes"], ref_boxes * 64 / 70)
        assert torch.equal(out["crops"], ref_crops)
        assert out["image"].shape == (3, 64, 64)


def test_proposals_file_without_the_image_is_an_error(tmp_path):
    _save_image(tmp_path / "a.png", 20, 20)
    (tmp_path / "p.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "b.png"}],
                                                 "annotations": [{"image_id": 1, "bbox": [0, 0, 10, 10]}]}))
    mapper = _mapper(INPUT__CLIPSELF__REGION_SOURCE="proposals", INPUT__CLIPSELF__PROPOSAL_FILE=str(
        tmp_path / "p.json"))
    with pytest.raises(KeyError, match="PROPOSAL_FILE"):
        mapper({"file_name": str(tmp_path / "a.png"), "image_id": 5})


def test_patch_mapper_regions_resize_and_crops(tmp_path):
    img = _save_image(tmp_path / "a.png", 48, 80)
    mapper = _mapper(INPUT__CLIPSELF__GRID_MAX_SPLIT=3, INPUT__CLIPSELF__SIZES=[40])
    random.seed(0)
    for _ in range(10):
        out = mapper({"file_name": str(tmp_path / "a.png"), "image_id": 0, "annotations": [1]})
        assert out["image"].shape == (3, 40, 40) and "annotations" not in out
        assert torch.all(out["image"][:, 24:] == 0)  # the black square below the resized image
        boxes = out["region_boxes"] * 2  # back to original pixels (80 -> 40)
        # at most 9 cells <= MAX_REGIONS: the regions are one whole grid (shuffled), covering the image once
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum()
        assert area.item() == pytest.approx(48 * 80)
        assert any(boxes.shape == (m * n, 4) and torch.allclose(
            torch.stack(sorted(boxes, key=lambda b: (b[1].item(), b[0].item()))), grid_boxes(48, 80, m, n),
            atol=1e-4) for m, n in grid_choices(3, 2.0))
        # teacher crops are cut from the full-resolution image
        assert torch.equal(out["crops"], crop_regions(img, boxes, 16))


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
            {"image_id": 7, "bbox": [90, 40, 30, 30]},   # kept as given (CLIPSelf neither clips nor checks)
            {"image_id": 7, "bbox": [0, 0, 3, 3]},       # too small
        ],
    }
    (tmp_path / "props.json").write_text(json.dumps(proposals))
    mapper = _mapper(INPUT__CLIPSELF__REGION_SOURCE="proposals", INPUT__CLIPSELF__PROPOSAL_FILE=str(tmp_path /
                     "props.json"), INPUT__CLIPSELF__SIZES=[100], INPUT__CLIPSELF__PROPOSAL_MIN_SIZE=8.0)
    for d in ({"file_name": str(tmp_path / "a.png"), "image_id": 7},
              {"file_name": str(tmp_path / "a.png"), "image_id": 0}):  # image folder id: matched by name
        out = mapper(d)
        assert sorted(out["region_boxes"].tolist()) == [[10, 10, 30, 30], [90, 40, 120, 70]]
    assert mapper.proposals[7].shape == (3, 4)


def test_proposal_crop_scale(tmp_path):
    img = _save_image(tmp_path / "a.png", 64, 64)
    (tmp_path / "p.json").write_text(json.dumps({"annotations": [{"image_id": 0, "bbox": [24, 24, 16, 16]}]}))
    mapper = _mapper(INPUT__CLIPSELF__REGION_SOURCE="proposals", INPUT__CLIPSELF__PROPOSAL_FILE=str(
        tmp_path / "p.json"), INPUT__CLIPSELF__CROP_SCALE=1.5, INPUT__CLIPSELF__CROP_SIZE=24)
    out = mapper({"file_name": str(tmp_path / "a.png"), "image_id": 0})
    # the teacher sees the 24x24 neighbourhood (1.5x), the student pools the box itself
    assert torch.equal(out["crops"][0], torch.as_tensor(img[20:44, 20:44]).permute(2, 0, 1))
    assert out["region_boxes"].tolist() == [[24 * 16, 24 * 16, 40 * 16, 40 * 16]]  # 64 -> 1024


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
