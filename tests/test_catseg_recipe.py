"""CAT-Seg's training recipe details outside the network: the training mapper's padding (INPUT.PAD_SIZE)."""
import random

import numpy as np
import pytest
from PIL import Image

from ovseg.config import get_ovseg_cfg
from ovseg.data.mappers import MaskSemanticMapper


@pytest.fixture
def wide_record(tmp_path):
    """An image much wider than tall: resized to short side 20 it stays shorter than the 32 px crop."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 90, 3), dtype=np.uint8)
    label = rng.integers(0, 4, (20, 90), dtype=np.uint8)
    label[:3] = 255
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray(label).save(tmp_path / "lbl.png")
    return {"file_name": str(tmp_path / "img.png"), "sem_seg_file_name": str(tmp_path / "lbl.png"),
            "height": 20, "width": 90}


def _mapper(pad_size: int, crop: int = 32):
    cfg = get_ovseg_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = (20,), 1000, "choice"
    cfg.INPUT.CROP.ENABLED, cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE = True, "absolute", (crop, crop)
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    cfg.INPUT.PAD_SIZE = pad_size
    return MaskSemanticMapper(cfg, True)


def _map(mapper, record, seed):
    random.seed(seed)
    np.random.seed(seed)
    return mapper(record)


def test_pad_size_pads_a_short_crop_with_128_and_ignore(wide_record):
    plain, padded = _mapper(0), _mapper(32)
    for seed in range(3):
        raw, out = _map(plain, wide_record, seed), _map(padded, wide_record, seed)
        h, w = raw["sem_seg"].shape
        assert (h, w) == (20, 32)  # the crop cannot be taller than the resized image
        # reference: a 32 x 32 canvas of the pad values with the unpadded sample in its top-left corner
        image = np.full((3, 32, 32), 128, dtype=np.uint8)
        image[:, :h, :w] = raw["image"].numpy()
        label = np.full((32, 32), 255, dtype=np.int64)
        label[:h, :w] = raw["sem_seg"].numpy()
        np.testing.assert_array_equal(out["image"].numpy(), image)
        np.testing.assert_array_equal(out["sem_seg"].numpy(), label)
        assert out["instances"].image_size == (32, 32)
        assert out["instances"].gt_classes.equal(raw["instances"].gt_classes)  # padding adds no class
        masks = out["instances"].gt_masks.tensor
        assert masks.shape[-2:] == (32, 32) and not masks[:, h:].any() and not masks[:, :, w:].any()


def test_pad_size_smaller_than_the_sample_is_an_error(wide_record):
    with pytest.raises(ValueError, match="larger than INPUT.PAD_SIZE"):
        _map(_mapper(16), wide_record, 0)
    with pytest.raises(ValueError, match="INPUT.PAD_SIZE"):
        _mapper(-1)
