"""CLIPDenseSegmentor: logits, sliding windows, and detectron2's SemSegEvaluator end to end."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_sem_seg
from detectron2.modeling import build_model
from PIL import Image

from ovseg.modeling.meta_arch import sliding_windows
from tests.helpers import tiny_cfg


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = build_model(tiny_cfg(MODEL__TEXT__VOCABULARY="red,green,blue"))
    return m.eval()


@pytest.mark.parametrize("in_hw,out_hw", [((48, 80), (96, 160)), ((40, 70), (80, 140))])
def test_sem_seg_equals_manual_computation_patch_merge(model, in_hw, out_hw):
    """"patch" merge: logits at patch resolution, one bilinear upsampling of the padded map to the output scale,
    crop, softmax."""
    model.window_merge = "patch"
    image = torch.randint(0, 256, (3, *in_hw)).float()
    with torch.no_grad():
        out = model([{"image": image, "height": out_hw[0], "width": out_hw[1]}])[0]["sem_seg"]
        x = (image - model.pixel_mean) / model.pixel_std
        padded = F.pad(x, (0, 80 - in_hw[1], 0, 48 - in_hw[0]))  # both cases pad to 48x80 (3x5 patches)
        dense = model.backbone(padded[None])["clip_dense"][0]  # (D, 3, 5)
        text = model.text_classifier("red,green,blue")
        logits = 100.0 * torch.einsum("dhw,cd->chw", dense, text)
        scale = out_hw[0] / in_hw[0]
        up = F.interpolate(logits[None], size=(round(48 * scale), round(80 * scale)), mode="bilinear",
                           align_corners=False)[0, :, :out_hw[0], :out_hw[1]]
        ref = up.softmax(0)
    assert out.shape == (3, *out_hw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.sum(0), torch.ones(out_hw), atol=1e-5, rtol=0)


@pytest.mark.parametrize("in_hw,out_hw", [((48, 80), (96, 160)), ((40, 70), (80, 140))])
def test_sem_seg_equals_manual_computation_image_merge(model, in_hw, out_hw):
    """"image" merge (default), whole image: the patch convolution reads the top-left 16-multiple part, the logit
    grid is stretched over the whole image, then resized to the output size."""
    image = torch.randint(0, 256, (3, *in_hw)).float()
    with torch.no_grad():
        out = model([{"image": image, "height": out_hw[0], "width": out_hw[1]}])[0]["sem_seg"]
        x = (image - model.pixel_mean) / model.pixel_std
        gh, gw = in_hw[0] // 16, in_hw[1] // 16
        dense = model.backbone(x[None, :, :16 * gh, :16 * gw])["clip_dense"][0]  # (D, gh, gw)
        logits = 100.0 * torch.einsum("dhw,cd->chw", dense, model.text_classifier("red,green,blue"))
        up = F.interpolate(logits[None], size=in_hw, mode="bilinear", align_corners=False)
        ref = F.interpolate(up, size=out_hw, mode="bilinear", align_corners=False)[0].softmax(0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_vocabulary_switch_without_rebuild(model):
    image = torch.randint(0, 256, (3, 32, 32)).float()
    with torch.no_grad():
        assert model([{"image": image}])[0]["sem_seg"].shape[0] == 3
        model.set_vocabulary("cat,dog")
        assert model([{"image": image}])[0]["sem_seg"].shape[0] == 2
    with pytest.raises(ValueError, match="empty"):
        model.set_vocabulary("")


def test_sliding_windows_cover_and_shrink():
    wins = sliding_windows((100, 130), 64, 48)
    cover = np.zeros((100, 130), int)
    for y0, x0, y1, x1 in wins:
        assert y1 - y0 == 64 and x1 - x0 == 64
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1
    assert sliding_windows((30, 20), 64, 32) == [(0, 0, 30, 20)]  # window larger than the image


def test_slide_with_one_window_equals_whole(model):
    image = torch.randint(0, 256, (3, 40, 56)).float()
    with torch.no_grad():
        whole = model([{"image": image}])[0]["sem_seg"]
        model.inference_mode, model.window_size, model.window_stride = "slide", 64, 32
        slide = model([{"image": image}])[0]["sem_seg"]
    torch.testing.assert_close(slide, whole)


def test_training_is_refused(model):
    model.train()
    with pytest.raises(RuntimeError, match="training-free"):
        model([{"image": torch.zeros(3, 32, 32)}])


def _make_sem_seg_dataset(root, name, n=3, classes=("red", "green", "blue")):
    img_dir, gt_dir = root / "images", root / "labels"
    img_dir.mkdir(parents=True)
    gt_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = 40 + 8 * i, 56
        label = rng.integers(0, len(classes), size=(h, w)).astype(np.uint8)
        label[:4] = 255  # ignored pixels
        img = rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8)
        Image.fromarray(img).save(img_dir / f"{i}.jpg")
        Image.fromarray(label).save(gt_dir / f"{i}.png")
    DatasetCatalog.register(name, lambda: load_sem_seg(str(gt_dir), str(img_dir), "png", "jpg"))
    MetadataCatalog.get(name).set(stuff_classes=list(classes), ignore_label=255, evaluator_type="sem_seg")


def test_semseg_evaluator_end_to_end(tmp_path):
    """train_net's Trainer.test with detectron2's SemSegEvaluator vs a confusion matrix computed here."""
    from ovseg import engine as train_net

    name = "_ovseg_test_synthetic_sem_seg"
    _make_sem_seg_dataset(tmp_path, name)
    cfg = tiny_cfg(OUTPUT_DIR=str(tmp_path / "out"), INPUT__MIN_SIZE_TEST=32)
    cfg.DATASETS.TEST = (name,)
    cfg.DATALOADER.NUM_WORKERS = 0
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    results = train_net.Trainer.test(cfg, model)[name]["sem_seg"]

    # independent: run the model on the same mapped inputs and count
    from detectron2.data import build_detection_test_loader

    gt_files = {d["file_name"]: d["sem_seg_file_name"] for d in DatasetCatalog.get(name)}
    conf = np.zeros((3, 3), np.int64)
    with torch.no_grad():
        for inputs in build_detection_test_loader(cfg, name):
            pred = model(inputs)[0]["sem_seg"].argmax(0).numpy()
            gt = np.array(Image.open(gt_files[inputs[0]["file_name"]]))
            valid = gt != 255
            np.add.at(conf, (gt[valid], pred[valid]), 1)
    union = conf.sum(0) + conf.sum(1) - np.diag(conf)
    present = conf.sum(1) > 0  # detectron2 averages over the classes present in the ground truth
    assert results["mIoU"] == pytest.approx(100 * (np.diag(conf)[present] / union[present]).mean(), abs=1e-6)
    assert results["pACC"] == pytest.approx(100 * np.diag(conf).sum() / conf.sum(), abs=1e-6)
