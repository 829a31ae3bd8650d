"""Flip / multi-scale test-time augmentation of `sem_seg` (SegmentorWithTTA): against a written-out average of
the model run at each scale, a flip-equivariant model, the panoptic / instance pass-through and the engine's
TEST.AUG switch."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.engine import DefaultTrainer
from detectron2.modeling import build_model
from torch import nn

from ovseg import engine
from ovseg.modeling.test_time_augmentation import SegmentorWithTTA
from tests.helpers import tiny_cfg
from tests.tiny_mask import tiny_mask_cfg

VOCAB = "red circle,green square,sky"


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return build_model(tiny_cfg(MODEL__TEXT__VOCABULARY=VOCAB)).eval()


@pytest.fixture(scope="module")
def mask():
    torch.manual_seed(0)
    cfg = tiny_mask_cfg(MODEL__TEXT__VOCABULARY=VOCAB, MODEL__MASK_SEG__TEST__INSTANCE_ON=True,
                        MODEL__MASK_SEG__TEST__OBJECT_MASK_THRESHOLD=0.0,
                        MODEL__MASK_SEG__TEST__OVERLAP_THRESHOLD=0.0)
    return build_model(cfg).eval()


class PerPixel(nn.Module):
    """A flip-equivariant segmentor: a 1x1 convolution of the colours, resized bilinearly to (height, width)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.proj = nn.Conv2d(3, 4, 1)

    def forward(self, batched_inputs):
        out = []
        for inp in batched_inputs:
            scores = self.proj(inp["image"][None].float())
            out.append({"sem_seg": F.interpolate(scores, (inp["height"], inp["width"]), mode="bilinear",
                                                 align_corners=False)[0]})
        return out


def reference_tta(model, inp, min_sizes, max_size, flip):
    """The rule written out: each scale's image by bilinear resizing to detectron2's shortest-edge shape, the model's
    scores at (height, width), flipped runs mirrored back, then the plain mean."""
    runs = []
    h, w = inp["image"].shape[-2:]
    for s in min_sizes:
        nh, nw = ResizeShortestEdge.get_output_shape(h, w, s, max_size)
        image = F.interpolate(inp["image"][None].float(), (nh, nw), mode="bilinear", align_corners=False)[0]
        with torch.no_grad():
            runs.append(model([{"image": image, "height": inp["height"], "width": inp["width"]}])[0]["sem_seg"])
            if flip:
                mirrored = model([{"image": image.flip(-1), "height": inp["height"], "width": inp["width"]}])
                runs.append(mirrored[0]["sem_seg"].flip(-1))
    return torch.stack(runs).mean(0)


@pytest.mark.parametrize("which", ["dense", "mask"])
def test_scales_and_flips_average_as_written_out(which, request):
    model = request.getfixturevalue(which)
    torch.manual_seed(2)
    inputs = [{"image": torch.rand(3, 40, 56) * 255, "height": 30, "width": 42},
              {"image": torch.rand(3, 48, 48) * 255, "height": 48, "width": 48}]
    tta = SegmentorWithTTA(model, min_sizes=(32, 48, 64), max_size=80, flip=True).eval()
    out = tta(inputs)
    for inp, res in zip(inputs, out):
        expected = reference_tta(model, inp, (32, 48, 64), 80, True)
        assert res["sem_seg"].shape == expected.shape == (3, inp["height"], inp["width"])
        torch.testing.assert_close(res["sem_seg"], expected, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            plain = model([inp])[0]["sem_seg"]
        assert not torch.allclose(res["sem_seg"], plain, atol=1e-3)  # the augmentation did something


@pytest.mark.parametrize("symmetric", [True, False])
def test_flip_changes_nothing_for_a_flip_equivariant_model(symmetric):
    """A per-pixel model's scores mirror with the image: averaging the un-mirrored flipped run is a no-op, on a
    left-right symmetric image and (the case a missing un-flip gets wrong) on any other."""
    torch.manual_seed(3)
    image = torch.rand(3, 32, 40) * 255
    if symmetric:
        image = torch.cat([image[..., :20], image[..., :20].flip(-1)], dim=-1)
    inp = {"image": image, "height": 32, "width": 40}
    model = PerPixel().eval()
    with torch.no_grad():
        plain = model([inp])[0]["sem_seg"]
    native = SegmentorWithTTA(model, min_sizes=(32,), max_size=100, flip=True).eval()([inp])
    torch.testing.assert_close(native[0]["sem_seg"], plain, atol=1e-4, rtol=1e-4)
    flipped = SegmentorWithTTA(model, min_sizes=(24, 32, 48), max_size=100, flip=True).eval()([inp])
    unflipped = SegmentorWithTTA(model, min_sizes=(24, 32, 48), max_size=100, flip=False).eval()([inp])
    torch.testing.assert_close(flipped[0]["sem_seg"], unflipped[0]["sem_seg"], atol=1e-4, rtol=1e-4)


def test_flip_of_a_symmetric_image_on_a_clip_model(dense):
    """CLIP's position embeddings are not mirror-symmetric, so on a symmetric image the flipped run gives the
    mirror of the plain scores S: the flip-only average is (S + S mirrored) / 2."""
    torch.manual_seed(4)
    half = torch.rand(3, 32, 24) * 255
    inp = {"image": torch.cat([half, half.flip(-1)], dim=-1), "height": 32, "width": 48}
    with torch.no_grad():
        plain = dense([inp])[0]["sem_seg"]
    out = SegmentorWithTTA(dense, min_sizes=(32,), max_size=100, flip=True).eval()([inp])
    torch.testing.assert_close(out[0]["sem_seg"], (plain + plain.flip(-1)) / 2, atol=1e-5, rtol=1e-5)


def test_panoptic_and_instances_pass_through_from_the_plain_run(mask):
    torch.manual_seed(5)
    inputs = [{"image": torch.rand(3, 48, 64) * 255, "height": 36, "width": 48}]
    with torch.no_grad():
        plain = mask(inputs)[0]
    out = SegmentorWithTTA(mask, min_sizes=(32, 64), max_size=100, flip=True).eval()(inputs)[0]
    assert set(out) == {"sem_seg", "panoptic_seg", "instances"}
    torch.testing.assert_close(out["sem_seg"], reference_tta(mask, inputs[0], (32, 64), 100, True))
    assert torch.equal(out["panoptic_seg"][0], plain["panoptic_seg"][0])
    assert out["panoptic_seg"][1] == plain["panoptic_seg"][1]
    for field in ("pred_masks", "pred_classes", "scores"):
        assert torch.equal(out["instances"].get(field), plain["instances"].get(field))


def test_semantic_only_model_runs_once_per_image_and_augmentation():
    calls = []
    model = PerPixel().eval()
    model.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    inputs = [{"image": torch.rand(3, 32, 40) * 255, "height": 32, "width": 40}] * 2
    SegmentorWithTTA(model, min_sizes=(24, 32), max_size=100, flip=True).eval()(inputs)
    assert calls == [1] * 8  # one image at a time, no extra unaugmented run


def test_bad_settings_are_clear_errors():
    model = PerPixel()
    with pytest.raises(ValueError, match="MIN_SIZES"):
        SegmentorWithTTA(model, min_sizes=(), max_size=100, flip=True)
    with pytest.raises(ValueError, match="MAX_SIZE"):
        SegmentorWithTTA(model, min_sizes=(64, 128), max_size=100, flip=True)
    with pytest.raises(RuntimeError, match="eval"):
        SegmentorWithTTA(model, min_sizes=(32,), max_size=100, flip=True).train()([])

    class NoSemantic(nn.Module):
        def forward(self, batched_inputs):
            return [{"instances": None} for _ in batched_inputs]

    with pytest.raises(ValueError, match="sem_seg"):
        SegmentorWithTTA(NoSemantic(), min_sizes=(32,), max_size=100, flip=False).eval()(
            [{"image": torch.rand(3, 32, 32), "height": 32, "width": 32}])


def test_engine_evaluates_the_augmented_model_when_test_aug_is_enabled(dense, monkeypatch, tmp_path):
    name = "tta_engine_spy_val"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(stuff_classes=["red circle", "green square", "sky"], evaluator_type="sem_seg")
    evaluated = []
    monkeypatch.setattr(DefaultTrainer, "test", classmethod(lambda cls, cfg, model, ev=None: evaluated.append(model)))
    cfg = tiny_cfg(MODEL__TEXT__VOCABULARY=VOCAB, OUTPUT_DIR=str(tmp_path))
    cfg.DATASETS.TEST = (name,)
    engine.Trainer.test(cfg, dense)
    cfg.TEST.AUG.ENABLED, cfg.TEST.AUG.MIN_SIZES, cfg.TEST.AUG.MAX_SIZE = True, (32, 48), 96
    engine.Trainer.test(cfg, dense)
    assert evaluated[0] is dense
    wrapped = evaluated[1]
    assert isinstance(wrapped, SegmentorWithTTA) and wrapped.model is dense
    assert wrapped.augmentations() == [(32, False), (32, True), (48, False), (48, True)]
    inp = {"image": torch.rand(3, 40, 40) * 255, "height": 40, "width": 40}
    torch.testing.assert_close(wrapped.eval()([inp])[0]["sem_seg"], reference_tta(dense, inp, (32, 48), 96, True))


def test_predictor_applies_test_aug_when_enabled():
    from ovseg import Predictor

    torch.manual_seed(0)
    cfg = tiny_cfg(INPUT__MIN_SIZE_TEST=32, INPUT__MAX_SIZE_TEST=1000, TEST__AUG__ENABLED=True,
                   TEST__AUG__MIN_SIZES=(32, 48), TEST__AUG__MAX_SIZE=96)
    predictor = Predictor(cfg, vocabulary=VOCAB)
    image = (torch.rand(40, 56, 3) * 255).to(torch.uint8).numpy()
    scores = predictor(image).outputs["sem_seg"]
    inp = predictor._model_input(image)  # the predictor's own resize to INPUT.MIN_SIZE_TEST, then TTA
    torch.testing.assert_close(scores, reference_tta(predictor.model, inp, (32, 48), 96, True))
