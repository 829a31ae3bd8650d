"""Training-free inference: sliding windows, one-shot upsampling, PAMR, background threshold, presets."""
import glob
import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from ovseg.config import get_ovseg_cfg
from ovseg.modeling.meta_arch import dense_segmentor
from ovseg.modeling.meta_arch.dense_segmentor import bilinear_matrix
from ovseg.modeling.pamr import PAMR
from tests.helpers import TINY_VIT, tiny_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg(MODEL__TEXT__VOCABULARY="background,red,green,blue")).eval()


def _image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g).float()


# ---------------------------------------------------------------- resampling


@pytest.mark.parametrize("n_in,n_out", [(3, 96), (5, 7), (7, 5), (4, 4), (1, 9)])
def test_bilinear_matrix_is_pytorch_bilinear(n_in, n_out):
    x = torch.randn(2, n_in, 6)
    ref = F.interpolate(x[None], size=(n_out, 6), mode="bilinear", align_corners=False)[0]
    m = bilinear_matrix(n_out, n_in, n_in / n_out)
    torch.testing.assert_close(torch.einsum("oi,cij->coj", m, x), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m.sum(1), torch.ones(n_out))


def test_non_multiple_size_resamples_the_image_part_of_the_padded_grid(model):
    """A 37x53 image covers 2.3125 x 3.3125 cells of its padded 3x4 patch grid: each output pixel is the bilinear
    lookup of the grid at its centre's patch coordinate, checked pixel by pixel ("patch" merge)."""
    model.window_merge = "patch"
    image = _image(37, 53)
    x = (image - model.pixel_mean) / model.pixel_std
    with torch.no_grad():
        text = model.text_classifier(model.vocabulary)
        low = model.low_res_logits(model.backbone.pad(x[None]), text)[0] / model.logit_scale  # (4, 3, 4)
        probs = model.segment(x, text, (20, 31))
    assert low.shape == (4, 3, 4) and probs.shape == (4, 20, 31)
    ref = torch.empty(4, 20, 31)
    for i in range(20):
        for j in range(31):
            sy = min(max((i + 0.5) * 37 / 20 / 16 - 0.5, 0), 2)
            sx = min(max((j + 0.5) * 53 / 31 / 16 - 0.5, 0), 3)
            y0, x0 = int(math.floor(sy)), int(math.floor(sx))
            y1, x1 = min(y0 + 1, 2), min(x0 + 1, 3)
            fy, fx = sy - y0, sx - x0
            ref[:, i, j] = ((1 - fy) * (1 - fx) * low[:, y0, x0] + (1 - fy) * fx * low[:, y0, x1]
                            + fy * (1 - fx) * low[:, y1, x0] + fy * fx * low[:, y1, x1])
    torch.testing.assert_close(probs, (model.logit_scale * ref).softmax(0), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- sliding windows


def test_slide_one_window_is_exactly_whole(model):
    image = _image(48, 64)
    with torch.no_grad():
        whole = model([{"image": image}])[0]["sem_seg"]
        model.inference_mode, model.window_size, model.window_stride = "slide", 64, 32
        slide = model([{"image": image}])[0]["sem_seg"]
    assert torch.equal(slide, whole)


def test_slide_averages_windows_on_the_patch_grid(model):
    """patch_logits in slide mode vs. a brute-force loop: every window run alone, each patch cell averaged."""
    model.inference_mode, model.window_size, model.window_stride, model.window_batch_size = "slide", 32, 16, 3
    image = _image(61, 75)  # odd: padded to 64 x 80, 4 x 5 patches
    x = (image - model.pixel_mean) / model.pixel_std
    with torch.no_grad():
        text = model.text_classifier(model.vocabulary)
        xp = F.pad(x, (0, 80 - 75, 0, 64 - 61))
        got = model._window_logits(xp, text) / model.logit_scale
        total, count = torch.zeros(4, 4, 5), torch.zeros(4, 5)
        for y0 in (0, 16, 32):  # 64 - 32 = 32: flush with the padded border
            for x0 in (0, 16, 32, 48):
                dense = model.backbone(xp[None, :, y0:y0 + 32, x0:x0 + 32])["clip_dense"][0]
                for i in range(2):
                    for j in range(2):
                        total[:, y0 // 16 + i, x0 // 16 + j] += text @ dense[:, i, j]
                        count[y0 // 16 + i, x0 // 16 + j] += 1
    torch.testing.assert_close(got, total / count, atol=1e-5, rtol=1e-5)


def test_window_larger_than_image_and_bad_geometry():
    cfg = tiny_cfg(MODEL__TEXT__VOCABULARY="a,b", MODEL__DENSE_SEG__INFERENCE_MODE="slide",
                   MODEL__DENSE_SEG__WINDOW_SIZE=448, MODEL__DENSE_SEG__WINDOW_STRIDE=224)
    m = build_model(cfg).eval()
    with torch.no_grad():
        assert m([{"image": _image(30, 20)}])[0]["sem_seg"].shape == (2, 30, 20)
    for size, stride, match in ((64, 96, "uncovered"), (0, 16, "positive")):
        with pytest.raises(ValueError, match=match):
            build_model(tiny_cfg(MODEL__DENSE_SEG__WINDOW_SIZE=size, MODEL__DENSE_SEG__WINDOW_STRIDE=stride))
    # "patch" merge: sizes off the patch grid are rounded down to it: 100/40 -> 96/32 on the 16-px grid
    m.window_merge, m.window_size, m.window_stride = "patch", 100, 40
    image = _image(80, 130)
    with torch.no_grad():
        got = m([{"image": image}])[0]["sem_seg"]
        m.window_size, m.window_stride = 96, 32
        assert torch.equal(got, m([{"image": image}])[0]["sem_seg"])


@pytest.mark.parametrize("pamr", [None, PAMR(2, (1, 3))])
def test_class_chunks_and_window_batches_do_not_change_the_result(model, monkeypatch, pamr):
    model.pamr = pamr
    model.inference_mode, model.window_size, model.window_stride = "slide", 32, 16
    image = _image(40, 56)
    with torch.no_grad():
        ref = model([{"image": image, "height": 50, "width": 70}])[0]["sem_seg"]
        monkeypatch.setattr(dense_segmentor, "_CHUNK_ELEMENTS", 50 * 70)  # one class per chunk
        model.window_batch_size = 1
        got = model([{"image": image, "height": 50, "width": 70}])[0]["sem_seg"]
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- background threshold


def test_background_threshold_matches_the_papers_rule(model):
    """SCLIP/NACLIP: label = argmax, then 0 (background) where the max probability < threshold."""
    image = _image(40, 56, seed=3)
    with torch.no_grad():
        probs = model([{"image": image}])[0]["sem_seg"]
        thd = float(probs.max(0).values.median())  # a threshold that flips about half of the pixels
        model.bg_threshold = thd
        got = model([{"image": image}])[0]["sem_seg"].argmax(0)
    ref = probs.argmax(0)
    ref[probs.max(0).values < thd] = 0
    assert torch.equal(got, ref) and (ref == 0).any() and (ref != 0).any()


def test_background_threshold_needs_a_background_class(model):
    model.bg_threshold = 0.1
    model.set_vocabulary("cat,dog")
    with pytest.raises(ValueError, match="BACKGROUND_CLASS.*cat"):
        model([{"image": _image(32, 32)}])
    with pytest.raises(ValueError, match="BG_THRESHOLD"):
        build_model(tiny_cfg(MODEL__DENSE_SEG__BG_THRESHOLD=1.5))


# ---------------------------------------------------------------- PAMR


def test_pamr_hand_built_cases():
    # constant image: every neighbour weighs 1/8; a delta spreads evenly to its 8 neighbours
    mask = torch.zeros(1, 5, 5)
    mask[0, 2, 2] = 1.0
    out = PAMR(1, (1,))(torch.ones(1, 3, 5, 5), mask[None])[0]
    expected = torch.zeros(1, 5, 5)
    expected[0, 1:4, 1:4] = 1 / 8
    expected[0, 2, 2] = 0
    torch.testing.assert_close(out, expected)
    # two flat regions: scores that follow the regions are left as they are (no bleeding across the edge)
    image = torch.zeros(3, 6, 8)
    image[:, :, 4:] = 10.0
    mask = torch.stack([(image[0] == 0).float(), (image[0] != 0).float()])
    torch.testing.assert_close(PAMR(10, (1,))(image[None], mask[None])[0], mask, atol=1e-6, rtol=0)


def test_pamr_in_the_segmentor_refines_logits(model):
    """PAMR on the output-size logits, against the standalone module applied to the unrefined logits."""
    model.window_merge = "patch"
    image = _image(40, 56, seed=1)
    x = (image - model.pixel_mean) / model.pixel_std
    with torch.no_grad():
        text = model.text_classifier(model.vocabulary)
        low = model.low_res_logits(model.backbone.pad(x[None]), text)
        up = F.interpolate(low, size=(48, 64), mode="bilinear", align_corners=False)[:, :, :40, :56]
        model.pamr = PAMR(2, (1, 2))
        got = model.segment(x, text)
    ref = PAMR(2, (1, 2))(x[None], up)[0].softmax(0)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_pamr_bad_arguments():
    with pytest.raises(ValueError, match="dilations"):
        PAMR(1, (0,))
    with pytest.raises(ValueError, match="num_iter"):
        PAMR(0)


# ---------------------------------------------------------------- presets


PRESETS = sorted(p for m in ("sclip", "clearclip", "naclip")
                 for p in [os.path.join(ROOT, "configs", "trainingfree", f"{m}_vitb16.yaml")]
                 + glob.glob(os.path.join(ROOT, "configs", "trainingfree", m, "*.yaml")))


def test_presets_load_and_say_what_they_are():
    assert len(PRESETS) == 3 + 3 * 8
    modes = {}
    for path in PRESETS:
        cfg = get_ovseg_cfg()
        cfg.merge_from_file(path)
        method = os.path.basename(path).split("_vitb16")[0] if path.endswith("_vitb16.yaml") else \
            os.path.basename(os.path.dirname(path))
        assert cfg.MODEL.CLIP.DENSE_MODE == method
        modes.setdefault(method, set()).add(cfg.MODEL.DENSE_SEG.BG_THRESHOLD > 0)
        if "_vitb16" not in path:
            assert len(cfg.DATASETS.TEST) == 1
            has_bg = any(b in path for b in ("voc21", "pc60", "coco_object"))
            assert (cfg.MODEL.DENSE_SEG.BG_THRESHOLD > 0) == has_bg, path
    assert set(modes) == {"sclip", "clearclip", "naclip"}
    demo = get_ovseg_cfg()
    demo.merge_from_file(os.path.join(ROOT, "configs", "trainingfree", "naclip_vitb16.yaml"))  # demo default
    assert demo.MODEL.CLIP.DENSE_MODE == "naclip" and demo.MODEL.DENSE_SEG.PAMR_ITERS == 10


@pytest.mark.parametrize("method", ["sclip", "clearclip", "naclip"])
def test_presets_run_on_the_tiny_model(method):
    cfg = get_ovseg_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs", "trainingfree", method, "voc21.yaml"))
    cfg.merge_from_list(["MODEL.CLIP.MODEL_NAME", TINY_VIT, "MODEL.CLIP.PRETRAINED", "", "MODEL.DEVICE", "cpu",
                         "MODEL.TEXT.TEMPLATES", "single"])
    m = build_model(cfg).eval()  # with the authors' VOC-21 class list the preset names
    with torch.no_grad():
        out = m([{"image": _image(64, 96), "height": 40, "width": 60}])[0]["sem_seg"]
    assert out.shape == (21, 40, 60)
    # per class the best synonym's share of one softmax: at most 1 in all, exactly 1 without synonyms
    assert (out.sum(0) <= 1 + 1e-5).all()
    if all(len(c) == 1 for c in m.vocabulary.classes):
        torch.testing.assert_close(out.sum(0), torch.ones(40, 60))
