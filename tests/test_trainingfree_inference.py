"""Sliding windows, the background rule and PAMR on small hand-built cases."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from ovseg.modeling.pamr import PAMR, neighbour_offsets
from tests.helpers import tiny_cfg


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg(MODEL__TEXT__VOCABULARY="background,cat,dog")).eval()


@pytest.mark.parametrize("hw", [(37, 83), (16, 16), (70, 30)])
def test_constant_features_give_a_seamless_constant_map(model, hw):
    text = model.text_classifier(model.vocabulary)
    feat = F.normalize(text[1] + 0.5 * text[2], dim=0)  # the same feature everywhere

    def constant_backbone(x):
        b, _, h, w = x.shape
        return {"clip_dense": feat.view(1, -1, 1, 1).expand(b, -1, h // 16, w // 16)}

    model.backbone.forward = constant_backbone
    model.inference_mode, model.window_size, model.window_stride = "slide", 32, 16
    with torch.no_grad():
        probs = model([{"image": torch.rand(3, *hw) * 255, "height": 2 * hw[0], "width": hw[1]}])[0]["sem_seg"]
    assert probs.shape == (3, 2 * hw[0], hw[1])
    expected = (100.0 * text @ feat).softmax(0)
    torch.testing.assert_close(probs, expected.view(3, 1, 1).expand_as(probs), atol=1e-5, rtol=1e-5)


def test_slide_equals_manual_window_average_patch_merge(model):
    """"patch" merge, two overlapping windows: their patch-resolution logits averaged where they overlap."""
    image = torch.rand(3, 32, 48) * 255
    model.window_merge = "patch"
    model.inference_mode, model.window_size, model.window_stride = "slide", 32, 16
    with torch.no_grad():
        out = model([{"image": image}])[0]["sem_seg"]
        x = (image - model.pixel_mean) / model.pixel_std
        text = model.text_classifier(model.vocabulary)
        left = model.low_res_logits(x[None, :, :, :32], text)[0]  # (3, 2, 2) over patch columns 0-1
        right = model.low_res_logits(x[None, :, :, 16:], text)[0]  # patch columns 1-2
        low = torch.zeros(3, 2, 3)
        low[:, :, :2] += left
        low[:, :, 1:] += right
        low[:, :, 1] /= 2
        ref = F.interpolate(low[None], size=(32, 48), mode="bilinear", align_corners=False)[0].softmax(0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_slide_equals_manual_window_average_image_merge(model):
    """"image" merge, two overlapping 32x32 windows at x = 0 and 16 of a 32x48 image: each window's logits
    upsampled to its 32x32 pixels, averaged per pixel where both cover it."""
    image = torch.rand(3, 32, 48) * 255
    model.inference_mode, model.window_size, model.window_stride = "slide", 32, 16
    with torch.no_grad():
        out = model([{"image": image}])[0]["sem_seg"]
        x = (image - model.pixel_mean) / model.pixel_std
        text = model.text_classifier(model.vocabulary)
        total = torch.zeros(3, 32, 48)
        for x0 in (0, 16):
            low = model.low_res_logits(x[None, :, :, x0:x0 + 32], text)  # (1, 3, 2, 2)
            total[:, :, x0:x0 + 32] += F.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)[0]
        total[:, :, 16:32] /= 2
    torch.testing.assert_close(out, total.softmax(0), atol=1e-5, rtol=1e-5)


def test_background_threshold(model):
    logits = torch.tensor([[0.0, 0.0], [5.0, 0.2], [0.0, 0.1]]).view(3, 1, 2)  # pixel 0 confident, pixel 1 not
    model.low_res_logits = lambda images, text: logits[None].expand(images.shape[0], -1, -1, -1)
    image = torch.zeros(3, 16, 32)
    probs = model.segment(image, torch.zeros(3, 32))
    assert probs.argmax(0)[0, 0] == 1 and probs.argmax(0)[0, -1] == 1  # argmax alone: "cat" everywhere
    model.bg_threshold = 0.5
    probs = model.segment(image, torch.zeros(3, 32))
    labels = probs.argmax(0)
    assert (labels[:, :8] == 1).all() and (labels[:, -8:] == 0).all()
    assert torch.equal(probs[:, 0, -1], torch.tensor([1.0, 0.0, 0.0]))
    model.set_vocabulary("cat,dog,bird")
    with pytest.raises(ValueError, match="BACKGROUND_CLASS"):
        model.segment(image, torch.zeros(3, 32))


def test_area_threshold(model):
    # 16 patches: "cat" wins 13, "dog" 3 (3/16 of the foreground), background never
    logits = torch.zeros(3, 4, 4)
    logits[1] = 4.0
    logits[2, 0, :3] = 8.0
    model.low_res_logits = lambda images, text: logits[None].expand(images.shape[0], -1, -1, -1)
    image = torch.zeros(3, 64, 64)
    text = torch.zeros(3, 32)
    model.bg_threshold = 0.0
    try:
        plain = model.segment(image, text)
        assert (plain.argmax(0) == 2).sum() > 0
        model.area_threshold = 0.25  # dog's share is below: its probabilities go, cat takes its pixels
        probs = model.segment(image, text)
        assert (probs[2] == 0).all() and (probs.argmax(0) == 1).all()
        torch.testing.assert_close(probs[:2], plain[:2])  # the other classes' probabilities untouched
        model.area_threshold = 0.1  # dog's share is above: nothing changes
        torch.testing.assert_close(model.segment(image, text), plain)
        model.set_vocabulary("cat,dog,bird")
        model.area_threshold = 0.25
        with pytest.raises(ValueError, match="AREA_THRESHOLD=0.25 need a class named 'background'"):
            model.segment(image, text)
    finally:
        model.area_threshold = 0.0
        model.set_vocabulary("background,cat,dog")


def _pamr_loops(image, scores, dilations):
    """One PAMR iteration written out pixel by pixel (replicate borders, unbiased std over the 3x3 windows)."""
    _, h, w = image.shape
    offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    out = torch.zeros_like(scores)
    for i in range(h):
        for j in range(w):
            nbs = [(min(max(i + dy, 0), h - 1), min(max(j + dx, 0), w - 1)) for dy, dx in offsets]
            # the PAMR authors' code: std over each dilation's 3x3 window, the centre once per dilation
            vals = torch.stack([image[:, i, j]] * len(dilations) + [image[:, a, b] for a, b in nbs])
            std = vals.std(dim=0)  # unbiased
            logits = torch.tensor([(-(image[:, a, b] - image[:, i, j]).abs() / (1e-8 + 0.1 * std)).mean()
                                   for a, b in nbs])
            weights = logits.softmax(0)
            out[:, i, j] = sum(wk * scores[:, a, b] for wk, (a, b) in zip(weights, nbs))
    return out


def test_pamr_matches_written_out_iteration():
    torch.manual_seed(0)
    image, scores = torch.rand(3, 6, 7), torch.rand(2, 6, 7)
    ref = _pamr_loops(image, scores, (1, 2))
    out = PAMR(num_iter=1, dilations=(1, 2))(image[None], scores[None])[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    two = PAMR(num_iter=2, dilations=(1, 2))(image[None], scores[None])[0]
    torch.testing.assert_close(two, _pamr_loops(image, ref, (1, 2)), atol=1e-5, rtol=1e-5)
    assert len(neighbour_offsets((1, 2, 4))) == 24


def test_pamr_respects_image_edges():
    image = torch.zeros(1, 3, 8, 8)
    image[..., 4:] = 1.0  # black | white
    image += 0.01 * torch.rand_like(image)
    scores = torch.zeros(1, 2, 8, 8)
    scores[:, 0, :, :4] = 1.0
    scores[:, 1, :, 4:] = 1.0
    scores[:, :, 3, 1] = torch.tensor([0.0, 1.0])  # one wrong pixel inside the black half
    out = PAMR(num_iter=10, dilations=(1, 2))(image, scores)
    labels = out.argmax(1)[0]
    assert (labels[:, :4] == 0).all() and (labels[:, 4:] == 1).all()  # the stray label is voted out, edge kept
    assert math.isclose(out.sum().item(), scores.sum().item(), rel_tol=0.05)  # weights sum to 1 per pixel
    with pytest.raises(ValueError, match="differ"):
        PAMR()(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 5, 5))


# ---------------------------------------------------------------- synonyms, chunks, presets' class lists


@pytest.mark.parametrize("merge", ["image", "patch"])
def test_synonyms_and_class_chunks(merge, monkeypatch):
    """One query per synonym, softmax over all, max per class: against the same done by hand on the full logits,
    and unchanged when classes are processed one chunk at a time (with PAMR on)."""
    from ovseg.modeling.meta_arch import dense_segmentor

    torch.manual_seed(0)
    m = build_model(tiny_cfg(MODEL__TEXT__VOCABULARY="background|sky|wall,cat|kitty,dog,car|automobile|truck",
                             MODEL__DENSE_SEG__WINDOW_MERGE=merge, MODEL__DENSE_SEG__INFERENCE_MODE="slide",
                             MODEL__DENSE_SEG__WINDOW_SIZE=32, MODEL__DENSE_SEG__WINDOW_STRIDE=16)).eval()
    m.pamr = PAMR(2, (1, 2))
    image = torch.rand(3, 40, 56) * 255
    x = (image - m.pixel_mean) / m.pixel_std
    with torch.no_grad():
        text, owner = m.text_classifier.synonym_embeddings(m.vocabulary)
        assert len(text) == 9 and owner.tolist() == [0, 0, 0, 1, 1, 2, 3, 3, 3]
        got = m([{"image": image, "height": 50, "width": 70}])[0]["sem_seg"]
        m.synonyms = "mean"  # one query per synonym given by hand: the per-query probabilities
        per_query = m.segment(x, text, (50, 70))
        ref = torch.stack([per_query[owner == c].amax(0) for c in range(4)])
        monkeypatch.setattr(dense_segmentor, "_CHUNK_ELEMENTS", 50 * 70)  # one class per chunk
        m.synonyms = "max"
        chunked = m([{"image": image, "height": 50, "width": 70}])[0]["sem_seg"]
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(chunked, ref, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="owner"):
        m.segment(x, text, (50, 70), owner=torch.tensor([0, 0, 2, 2, 2, 2, 2, 3, 3]))  # class 1 missing


def _norm(name):
    return name.lower().replace(" ", "").replace("-", "").replace("_", "")


BENCHMARKS = {"ade20k": "ade20k_150_sem_seg_val", "cityscapes": "cityscapes_19_sem_seg_val",
              "coco_object": "coco_object_sem_seg_val", "coco_stuff": "coco_stuff_164k_sem_seg_val",
              "pc59": "pascal_context_59_sem_seg_val", "pc60": "pascal_context_60_sem_seg_val",
              "voc20": "pascal_voc_20_sem_seg_val", "voc21": "pascal_voc_21_sem_seg_val"}


@pytest.mark.parametrize("method", ["sclip", "clearclip", "naclip"])
def test_presets_use_the_authors_class_lists(method):
    """Each benchmark preset names its authors' file; the file has the benchmark's classes in its order (names
    compared loosely, >= 80 % alike: the authors write "chestofdrawers", "ship" for boat), and the background rule
    finds the
    class at index 0."""
    from detectron2.data import MetadataCatalog

    import ovseg.data  # noqa: F401  (registers the benchmarks)
    from ovseg.config import get_ovseg_cfg
    from ovseg.modeling.text import parse_vocabulary

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = "clearclip" if method == "clearclip" else "sclip"  # NACLIP's files are SCLIP's
    for bench, dataset in BENCHMARKS.items():
        cfg = get_ovseg_cfg()
        cfg.merge_from_file(os.path.join(root, "configs", "trainingfree", method, f"{bench}.yaml"))
        assert cfg.MODEL.TEXT.VOCABULARY.startswith(f"ovseg://data/class_lists/authors/{folder}/cls_"), bench
        vocab = parse_vocabulary(cfg.MODEL.TEXT.VOCABULARY)
        meta = MetadataCatalog.get(dataset)
        names = meta.stuff_classes
        assert len(vocab) == len(names), bench
        ours = [{_norm(s) for s in entry.split("|")} for entry in meta.vocabulary]
        same = [bool(o & {_norm(s) for s in c}) for o, c in zip(ours, vocab.classes)]
        assert sum(same) >= 0.8 * len(same), (bench, [c[0] for c, ok in zip(vocab.classes, same) if not ok])
        if cfg.MODEL.DENSE_SEG.BG_THRESHOLD > 0 or cfg.MODEL.DENSE_SEG.AREA_THRESHOLD > 0:
            assert names[0] == "background" and cfg.MODEL.DENSE_SEG.BACKGROUND_CLASS == vocab.names[0], bench
        if method == "naclip":
            assert cfg.MODEL.DENSE_SEG.INFERENCE_MODE == ("whole" if bench in ("voc20", "voc21") else "slide")
        assert cfg.MODEL.CLIP.POS_EMBED_RESIZE == "scale_factor"
        assert cfg.MODEL.DENSE_SEG.UNALIGNED_WINDOWS == ("pad" if method == "clearclip" else "truncate")
