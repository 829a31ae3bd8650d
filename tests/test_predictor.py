"""ovseg.Predictor on the tiny random CLIP: the same results as the model called directly, every input type,
batching, the vocabulary kept between calls, the drawing and the errors."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg import Predictor
from ovseg.predictor import resolve_config
from tests.helpers import tiny_cfg
from tests.tiny_mask import tiny_mask_cfg

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "demo" / "examples" / "scene.jpg"
TINY = ["MODEL.CLIP.MODEL_NAME", "ovseg-tiny-ViT-16", "MODEL.CLIP.PRETRAINED", "", "MODEL.TEXT.TEMPLATES", "single"]
VOCAB = ["sky", "grass|lawn", "house"]


def _image(h=40, w=56, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


def _direct(model, image: np.ndarray, short: int, max_size: int):
    """The model called by hand: PIL bilinear resize of the short side (detectron2's rule written out), CHW float
    input, output at the original size."""
    h, w = image.shape[:2]
    scale = short / min(h, w)
    nh, nw = (short, w * scale) if h < w else (h * scale, short)
    if max(nh, nw) > max_size:
        nh, nw = nh * max_size / max(nh, nw), nw * max_size / max(nh, nw)
    nh, nw = int(nh + 0.5), int(nw + 0.5)
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    x = torch.as_tensor(resized.transpose(2, 0, 1).astype(np.float32))
    with torch.no_grad():
        return model([{"image": x, "height": h, "width": w}])[0]


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return Predictor(tiny_cfg(INPUT__MIN_SIZE_TEST=32, INPUT__MAX_SIZE_TEST=1000), vocabulary=VOCAB)


@pytest.fixture(scope="module")
def masks():
    torch.manual_seed(0)
    cfg = tiny_mask_cfg(INPUT__MIN_SIZE_TEST=32, INPUT__MAX_SIZE_TEST=1000, MODEL__MASK_SEG__TEST__INSTANCE_ON=True)
    return Predictor(cfg, vocabulary=VOCAB)


@pytest.mark.parametrize("which", ["dense", "masks"])
def test_same_as_model_called_directly(which, request):
    p = request.getfixturevalue(which)
    image = _image(40, 56)
    out = p(image, vocabulary=VOCAB)
    ref = _direct(p.model, image, 32, 1000)
    assert out.sem_seg.shape == (40, 56) and out.sem_seg.dtype == torch.int64
    assert torch.equal(out.sem_seg, ref["sem_seg"].argmax(0))
    if which == "masks":
        seg, info = out.panoptic
        assert torch.equal(seg, ref["panoptic_seg"][0]) and info == ref["panoptic_seg"][1]
        assert torch.equal(out.instances.scores, ref["instances"].scores)
    else:
        assert out.panoptic is None and out.instances is None


def test_input_types_agree(dense, tmp_path):
    image = _image(40, 56, seed=1)
    Image.fromarray(image).save(tmp_path / "x.png")
    expected = dense(image).sem_seg
    for given in (str(tmp_path / "x.png"), tmp_path / "x.png", Image.fromarray(image),
                  torch.as_tensor(image).permute(2, 0, 1), torch.as_tensor(image).permute(2, 0, 1).float()):
        assert torch.equal(dense(given).sem_seg, expected), type(given)
    gray = Image.fromarray(image).convert("L")
    assert torch.equal(dense(gray).sem_seg, dense(np.asarray(gray.convert("RGB"))).sem_seg)


@pytest.mark.parametrize("which", ["dense", "masks"])
def test_batch_equals_one_by_one(which, request):
    p = request.getfixturevalue(which)
    images = [_image(40, 56, 2), _image(48, 48, 3), _image(40, 56, 4), _image(40, 56, 5)]
    calls = []
    forward = p.model.forward
    p.model.forward = lambda batch: calls.append(len(batch)) or forward(batch)
    try:
        together = p(images)
    finally:
        del p.model.forward
    assert sorted(calls) == [1, 3]  # the three 40x56 images in one forward, the square one alone
    for image, out in zip(images, together):
        alone = p(image)
        assert torch.equal(out.sem_seg, alone.sem_seg) and out.sem_seg.shape == image.shape[:2]
        assert torch.allclose(out.outputs["sem_seg"], alone.outputs["sem_seg"], atol=1e-5)


def test_vocabulary_kept_between_calls(dense):
    clf = dense.model.text_classifier
    image = _image(32, 32, 6)
    dense(image, vocabulary=["zebra", "tree"])
    forwards = clf.num_encoder_forwards
    set_calls = []
    original = dense.model.set_vocabulary
    dense.model.set_vocabulary = lambda v: set_calls.append(v) or original(v)
    try:
        out = dense(image, vocabulary=["zebra", "tree"])
        out2 = dense(image, vocabulary="zebra,tree")  # the same classes written another way
        out3 = dense(image)  # no vocabulary: the last one
        assert set_calls == [] and clf.num_encoder_forwards == forwards
        assert out.vocabulary.names == out3.vocabulary.names == ["zebra", "tree"]
        assert torch.equal(out.sem_seg, out2.sem_seg)
        dense(image, vocabulary=["zebra", "car"])
        assert len(set_calls) == 1 and clf.num_encoder_forwards == forwards + 1  # only "car" encoded
    finally:
        del dense.model.set_vocabulary
        dense.set_vocabulary(VOCAB)


@pytest.mark.parametrize("which", ["dense", "masks"])
def test_visualize(which, request):
    p = request.getfixturevalue(which)
    image = _image(40, 56, 7)
    out = p(image)
    vis = out.visualize()
    assert vis.shape == (40, 56, 3) and vis.dtype == np.uint8
    assert not np.array_equal(vis, image)  # something was drawn
    areas = out.class_areas()
    counts = torch.bincount(out.sem_seg.flatten(), minlength=3)
    assert areas == {VOCAB[i].split("|")[0]: counts[i].item() / (40 * 56) for i in range(3) if counts[i] > 0}


def test_errors(dense, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        dense(_image(), vocabulary=[])
    with pytest.raises(ValueError, match="empty"):
        dense(_image(), vocabulary=" ")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="image 1: cannot read image.*broken.jpg"):
        dense([_image(), bad])
    with pytest.raises(ValueError, match="cannot read image.*missing.jpg"):
        dense(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        dense(_image().astype(np.float32))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        dense(torch.zeros(40, 56, 3))
    with pytest.raises(TypeError, match="expected a path"):
        dense(12)
    with pytest.raises(ValueError, match="no images"):
        dense([])
    no_vocab = Predictor(tiny_cfg())
    with pytest.raises(ValueError, match="no vocabulary: pass vocabulary="):
        no_vocab(_image())


def test_input_format_bgr_arrays(dense):
    """An OpenCV (BGR) array given with input_format="BGR" is read as the same image in RGB; without it the channels
    are swapped (the silent misreading the option exists for)."""
    bgr_p = Predictor(tiny_cfg(INPUT__MIN_SIZE_TEST=32, INPUT__MAX_SIZE_TEST=1000), vocabulary=VOCAB,
                      input_format="BGR")
    bgr_p.model.load_state_dict(dense.model.state_dict())
    rgb = _image(40, 56, seed=7)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    expected = dense(rgb, vocabulary=VOCAB)
    for given in (bgr, torch.as_tensor(bgr).permute(2, 0, 1), Image.fromarray(rgb)):  # PIL images stay RGB
        out = bgr_p(given)
        assert torch.equal(out.outputs["sem_seg"], expected.outputs["sem_seg"]), type(given)
        assert np.array_equal(out.image, rgb)  # drawn in RGB
    misread = dense(bgr).outputs["sem_seg"]
    assert not torch.allclose(misread, expected.outputs["sem_seg"], atol=1e-4)
    with pytest.raises(ValueError, match=r"input_format='rgb'.*\['RGB', 'BGR'\]"):
        Predictor(tiny_cfg(), input_format="rgb")


def test_bgr_model_config_takes_bgr_arrays_by_default():
    """INPUT.FORMAT="BGR" (a model fed BGR): arrays default to that order and reach the model unflipped."""
    torch.manual_seed(0)
    p = Predictor(tiny_cfg(INPUT__FORMAT="BGR", INPUT__MIN_SIZE_TEST=32, INPUT__MAX_SIZE_TEST=1000),
                  vocabulary=VOCAB)
    assert p.input_format == "BGR"
    bgr = _image(40, 56, seed=8)
    out = p(bgr)
    ref = _direct(p.model, bgr, 32, 1000)  # the BGR array fed to the model as is
    assert torch.equal(out.outputs["sem_seg"], ref["sem_seg"])
    assert np.array_equal(out.image, bgr[:, :, ::-1])
    rgb_p = Predictor(p.cfg, vocabulary=VOCAB, input_format="RGB")
    rgb_p.model.load_state_dict(p.model.state_dict())
    assert torch.equal(rgb_p(np.ascontiguousarray(bgr[:, :, ::-1])).outputs["sem_seg"], ref["sem_seg"])


def test_config_names(tmp_path):
    naclip = resolve_config("naclip_vitb16")
    assert naclip == ROOT / "ovseg" / "configs" / "trainingfree" / "naclip_vitb16.yaml"
    assert resolve_config("naclip/ade20k") == ROOT / "ovseg" / "configs" / "trainingfree" / "naclip" / "ade20k.yaml"
    assert resolve_config(str(naclip)) == naclip
    with pytest.raises(ValueError, match="ambiguous.*clearclip/ade20k.yaml.*naclip/ade20k.yaml"):
        resolve_config("ade20k")
    with pytest.raises(FileNotFoundError, match="naclip_vitb61.*close names: \\['naclip_vitb16'"):
        resolve_config("naclip_vitb61")


def test_shipped_config_by_name_runs():
    p = Predictor("naclip_vitb16", device="cpu", opts=TINY + ["INPUT.MIN_SIZE_TEST", "32"])
    assert p.cfg.MODEL.CLIP.DENSE_MODE == "naclip" and p.cfg.MODEL.DENSE_SEG.PAMR_ITERS == 10
    out = p(str(EXAMPLE), vocabulary="sky,grass,house")
    assert out.sem_seg.shape == (256, 384)
    assert torch.equal(out.sem_seg, _direct(p.model, np.asarray(Image.open(EXAMPLE).convert("RGB")), 32,
                                            p.cfg.INPUT.MAX_SIZE_TEST)["sem_seg"].argmax(0))


def test_cuda_config_with_a_dtype_runs_on_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    p = Predictor(tiny_cfg(MODEL__DEVICE="cuda", INPUT__MIN_SIZE_TEST=32), dtype="fp32", vocabulary=VOCAB)
    assert p.cfg.MODEL.DEVICE == "cpu" and p(_image(32, 40)).sem_seg.shape == (32, 40)


def test_weights_are_loaded_safely_and_strictly(tmp_path):
    import pickle

    from ovseg.engine import UserError

    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    cfg = tiny_mask_cfg(INPUT__MIN_SIZE_TEST=32)
    pkl = tmp_path / "model.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {"x": Hostile()}}, f)
    with pytest.raises(UserError, match="TRUST_PICKLED_WEIGHTS"):
        Predictor(cfg, weights=str(pkl), vocabulary=VOCAB)
    assert not marker.exists()
    # a checkpoint of another model (16 queries instead of 8) is an error, not skipped parameters
    from detectron2.modeling import build_model

    other = build_model(tiny_mask_cfg(MODEL__MASK_SEG__DECODER__NUM_QUERIES=16, MODEL__TEXT__VOCABULARY="a"))
    pth = tmp_path / "other.pth"
    torch.save({"model": other.state_dict()}, pth)
    with pytest.raises(UserError, match="do not fit the model"):
        Predictor(cfg, weights=str(pth), vocabulary=VOCAB)


def test_config_mistakes_get_the_command_lines_errors():
    from ovseg.engine import UserError

    with pytest.raises(UserError, match="unknown config key INPUT.MIN_SIZE_TESTT .*did you mean INPUT.MIN_SIZE_TEST"):
        Predictor("naclip_vitb16", opts=["INPUT.MIN_SIZE_TESTT", "32"])
    with pytest.raises(UserError, match="odd number"):
        Predictor(tiny_cfg(), opts=["INPUT.MIN_SIZE_TEST"])


def test_repr_is_one_short_line():
    # print(prediction) in a notebook printed every pixel of the input image
    from ovseg.modeling.text import parse_vocabulary
    from ovseg.predictor import Prediction

    vocab = parse_vocabulary("cat,sofa|couch,sky")
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    text = repr(Prediction(image=image, vocabulary=vocab, outputs={"sem_seg": torch.zeros(3, 48, 64)}))
    assert "\n" not in text and len(text) < 200, text
    assert "64x48" in text and "3 classes: cat, sofa, sky" in text and "sem_seg" in text
