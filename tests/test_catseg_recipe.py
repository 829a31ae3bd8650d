"""CAT-Seg's training recipe details outside the network: the training mapper's padding (INPUT.PAD_SIZE)."""
import random

import numpy as np
import pytest

from ovseg.config import get_ovseg_cfg
from ovseg.data.mappers import MaskSemanticMapper
from tests.helpers import random_sem_seg_record


@pytest.fixture
def wide_record(tmp_path):
    """An image much wider than tall: resized to short side 20 it stays shorter than the 32 px crop."""
    return random_sem_seg_record(tmp_path, 20, 90, 3)


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


# ---- MODEL.TEXT.DATASET_VOCABULARIES: a paper's own class names per dataset ----------------------------------------

def _register(name, classes):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(stuff_classes=classes)
    return name


def _tiny_catseg(**overrides):
    from detectron2.modeling import build_model

    from tests.test_catseg import tiny_catseg_cfg
    cfg = tiny_catseg_cfg(**{"MODEL__TEXT__VOCABULARY": "", **overrides})
    return cfg, build_model(cfg)


def test_dataset_vocabularies_name_the_classes_in_training_and_testing():
    from ovseg.engine.trainer import set_test_vocabulary
    train = _register("_catseg_names_train", ["sky", "grass", "road"])
    test = _register("_catseg_names_test", ["car", "tree"])
    entries = f"['{train}=heaven|sky,lawn,street', '{test} = automobile,tree']"
    cfg, model = _tiny_catseg(DATASETS__TRAIN=f"('{train}',)", DATASETS__TEST=f"('{test}',)",
                              MODEL__TEXT__DATASET_VOCABULARIES=entries)
    assert model.train_vocabulary.names == ["heaven", "lawn", "street"]
    assert model.vocabulary.names == ["automobile", "tree"]  # the initial one, DATASETS.TEST[0]
    model.set_vocabulary("x,y,z")
    set_test_vocabulary(model, cfg, test)  # what the trainer does before each test set
    assert model.vocabulary.names == ["automobile", "tree"]
    # the evaluator's seen split compares the names the model uses: "tree" only, were it trained on those
    cfg.MODEL.CATSEG.TRAIN_VOCABULARY = "car,tree,sky"
    assert type(model).seen_for_dataset(cfg, test) == [False, True]
    # MODEL.TEXT.VOCABULARY (a user's one-off names) comes first
    cfg.MODEL.TEXT.VOCABULARY = "vehicle,plant"
    set_test_vocabulary(model, cfg, test)
    assert model.vocabulary.names == ["vehicle", "plant"]


def test_dataset_vocabularies_of_the_wrong_size_or_form_are_refused():
    train = _register("_catseg_names_train", ["sky", "grass", "road"])
    with pytest.raises(ValueError, match="DATASET_VOCABULARIES' entry for '_catseg_names_train' has 2 classes"):
        _tiny_catseg(DATASETS__TRAIN=f"('{train}',)", MODEL__TEXT__DATASET_VOCABULARIES=f"['{train}=a,b']")
    with pytest.raises(ValueError, match="is not '<dataset>=<vocabulary>'"):
        _tiny_catseg(DATASETS__TRAIN=f"('{train}',)", MODEL__TEXT__DATASET_VOCABULARIES="['a,b,c']")
    with pytest.raises(ValueError, match="twice"):
        _tiny_catseg(DATASETS__TRAIN=f"('{train}',)",
                     MODEL__TEXT__DATASET_VOCABULARIES=f"['{train}=a,b,c', '{train}=d,e,f']")


def test_catseg_configs_use_the_authors_class_names():
    """Training and the benchmarks the authors report (eval.sh) are named as in their class JSONs: here a few of the
    names where ovseg's own lists differ (COCO-Stuff's suffixed stuff names, ADE's and PC-459's originals)."""
    from ovseg.engine import load_config_file
    from ovseg.modeling.meta_arch.base import OpenVocabModel
    from ovseg.modeling.text import dataset_vocabulary, parse_vocabulary
    from ovseg.utils.paths import resolve_package_path

    cfg = load_config_file(resolve_package_path("ovseg://configs/catseg/catseg_vitb16_coco_stuff.yaml"), warn=False)
    expected = {  # dataset -> {class index: the authors' name}
        "coco_stuff_164k_sem_seg_train": {161: "wall-other", 84: "building-other", 133: "playingfield"},
        "coco_stuff_164k_sem_seg_val": {161: "wall-other", 145: "sky-other"},
        "ade20k_150_sem_seg_val": {37: "bathtub", 138: "ashcan", 8: "windowpane"},
        "pascal_context_59_sem_seg_val": {49: "diningtable"},
        "pascal_context_459_sem_seg_val": {2: "airconditioner", 430: "unknown"},
        "pascal_voc_20_sem_seg_val": {19: "tvmonitor", 15: "pottedplant"},
    }
    for dataset, names in expected.items():
        spec = OpenVocabModel.test_vocabulary_spec(cfg, dataset)
        assert spec, dataset
        vocab, own = parse_vocabulary(spec), dataset_vocabulary(dataset)[0]
        assert len(vocab) == len(own), dataset
        for i, name in names.items():
            assert vocab.names[i] == name != own.names[i], (dataset, i)
    from ovseg.modeling.meta_arch.catseg import CATSegSegmentor
    assert parse_vocabulary(CATSegSegmentor.training_vocabulary_spec(cfg)).names[161] == "wall-other"


def test_loss_is_per_class_bce_with_ignored_pixels_all_negative():
    """The authors' loss, written out pixel by pixel: logits upsampled (bilinear) to the labels, then the mean over
    images, pixels and classes of the binary cross-entropy against one-hot labels; an ignored pixel is a negative for
    every class (it still counts in the mean)."""
    import math

    import torch
    import torch.nn.functional as F
    _, model = _tiny_catseg()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=g)
    labels = torch.randint(0, 3, (2, 8, 10), generator=g)
    labels[0, :2] = 255
    loss = model.losses(logits, labels)["loss_sem_seg"]
    up = F.interpolate(logits, size=(8, 10), mode="bilinear", align_corners=False)
    total, count = 0.0, 0
    for b in range(2):
        for y in range(8):
            for x in range(10):
                for c in range(3):
                    p = 1 / (1 + math.exp(-up[b, c, y, x].item()))
                    positive = labels[b, y, x].item() == c  # never true for 255
                    total -= math.log(p) if positive else math.log(1 - p)
                    count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    with pytest.raises(ValueError, match="outside the 3 training classes"):
        model.losses(logits, torch.full((2, 8, 10), 3))


def test_slide_geometry_leaving_pixels_uncovered_is_refused():
    """Resized side 96, window 64: stride 48 would leave pixels 64..95 in no window (their average: NaN)."""
    import torch
    with pytest.raises(ValueError, match="SLIDE_STRIDE=48 must be positive and divide"):
        _tiny_catseg(MODEL__CATSEG__SLIDE_STRIDE=48)
    _tiny_catseg(MODEL__CATSEG__SLIDE_STRIDE=48, MODEL__CATSEG__INFERENCE_MODE="whole")  # no windows: no check
    _, model = _tiny_catseg(MODEL__CATSEG__SLIDE_STRIDE=16, MODEL__TEXT__VOCABULARY="cat,dog")  # 3 x 3 windows
    with torch.no_grad():
        out = model.eval()([{"image": torch.randint(0, 255, (3, 50, 130)).float()}])[0]["sem_seg"]
    assert out.shape == (2, 50, 130) and torch.isfinite(out).all()
