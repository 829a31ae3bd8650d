"""INPUT.COLOR_AUG_SSD in the "mask_semantic" training mapper: each photometric step of SSD's colour augmentation,
replayed here from the same seed and written out with numpy / cv2, gives the mapper's image; labels are untouched."""
import random

import cv2
import numpy as np
import pytest

from ovseg.config import get_ovseg_cfg
from ovseg.data.mappers import MaskSemanticMapper
from tests.helpers import random_sem_seg_record


def _clip_uint8(x):
    return np.clip(x, 0, 255).astype(np.uint8)  # saturate, then truncate toward zero


def _brightness(bgr, delta):
    return _clip_uint8(bgr.astype(np.float32) + delta)


def _contrast(bgr, alpha):
    return _clip_uint8(bgr.astype(np.float32) * alpha)


def _saturation(bgr, alpha):
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    hsv[..., 1] = _clip_uint8(hsv[..., 1].astype(np.float32) * alpha)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def _hue(bgr, shift):
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(int) + shift) % 180  # OpenCV's 8-bit hue: 0..179
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def _reference(rgb, rng: random.Random, applied: set):
    """SSD's colour augmentation (Liu et al. 2016, as detectron2 / Mask2Former draw it): in BGR, each step a coin
    flip; brightness +U(-32, 32); then contrast first or last around saturation and hue; contrast x U(0.5, 1.5);
    saturation x U(0.5, 1.5); hue + randint(-18, 18) degrees/2."""
    img = rgb[..., ::-1]
    if rng.randrange(2):
        img = _brightness(img, rng.uniform(-32, 32))
        applied.add("brightness")
    contrast_first = rng.randrange(2)
    steps = ["contrast", "saturation", "hue"] if contrast_first else ["saturation", "hue", "contrast"]
    applied.add("contrast first" if contrast_first else "contrast last")
    for step in steps:
        if not rng.randrange(2):
            continue
        applied.add(step)
        if step == "contrast":
            img = _contrast(img, rng.uniform(0.5, 1.5))
        elif step == "saturation":
            img = _saturation(img, rng.uniform(0.5, 1.5))
        else:
            img = _hue(img, rng.randint(-18, 18))
    return np.ascontiguousarray(img[..., ::-1])


@pytest.fixture
def record(tmp_path):
    return random_sem_seg_record(tmp_path, 40, 56, 5)


def _mapper(color_aug: bool, geometric: bool):
    cfg = get_ovseg_cfg()
    cfg.INPUT.COLOR_AUG_SSD = color_aug
    if geometric:  # resize, crop and flip around the colour steps
        cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (48, 64), 1000
        cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
        cfg.INPUT.CROP.ENABLED, cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE = True, "absolute", (32, 32)
        cfg.INPUT.RANDOM_FLIP = "horizontal"
    else:  # the image as read: only the colour changes
        cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (40,), 1000
        cfg.INPUT.CROP.ENABLED, cfg.INPUT.RANDOM_FLIP = False, "none"
    return MaskSemanticMapper(cfg, True)


def _map(mapper, record, seed):
    random.seed(seed)  # the training stream seeds both per sample
    np.random.seed(seed)
    return mapper(record)


def test_each_colour_step_equals_its_formula_and_labels_are_untouched(record):
    plain, coloured = _mapper(False, False), _mapper(True, False)
    applied = set()
    for seed in range(24):
        raw, out = _map(plain, record, seed), _map(coloured, record, seed)
        expected = _reference(raw["image"].permute(1, 2, 0).numpy(), random.Random(seed), applied)
        np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), expected, err_msg=f"seed {seed}")
        assert out["sem_seg"].equal(raw["sem_seg"])
        assert out["instances"].gt_classes.equal(raw["instances"].gt_classes)
        assert out["instances"].gt_masks.tensor.equal(raw["instances"].gt_masks.tensor)
    # the seeds exercised every step and both orders
    assert applied == {"brightness", "contrast", "saturation", "hue", "contrast first", "contrast last"}


def test_colour_augmentation_after_resize_and_crop_leaves_labels_alone(record):
    plain, coloured = _mapper(False, True), _mapper(True, True)
    changed = 0
    for seed in range(6):
        raw, out = _map(plain, record, seed), _map(coloured, record, seed)
        # the geometric draws (numpy) are the same with or without it; the colour ones (random) come on top
        assert out["sem_seg"].equal(raw["sem_seg"]) and out["image"].shape == raw["image"].shape == (3, 32, 32)
        assert out["instances"].gt_masks.tensor.equal(raw["instances"].gt_masks.tensor)
        expected = _reference(raw["image"].permute(1, 2, 0).numpy(), random.Random(seed), set())
        np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), expected)
        changed += not out["image"].equal(raw["image"])
    assert changed > 0
