"""ovseg.export on the tiny random CLIP: the ONNX model (onnxruntime) and the reloaded torch.export program give what
the model gives in PyTorch, at image sizes other than the one traced, on and off the patch grid.

Tolerance: 1e-5 absolute on probabilities / scores (float32 reassociation; measured ~3e-6), labels exactly equal.
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from ovseg.export import export_model, export_module, panoptic_from_outputs
from ovseg.modeling.backbone.clip_vit import bicubic_matrix
from tests.helpers import tiny_cfg
from tests.tiny_mask import tiny_mask_cfg

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is missing: pip install -e '.[export]'")

VOCAB = ["cat", "dog|puppy", "sky", "grass"]
THINGS = [True, True, False, False]
ATOL = 1e-5
# the traced example is 50x70 (off the 16-px grid): one size on the grid, one off it, neither the traced one, and the
# tiny tower's native 64x64 (its positional embedding is used as it is there, not resampled)
SIZES = [(48, 64), (45, 83), (64, 64)]


def _image(size, seed):
    torch.manual_seed(seed)
    return torch.rand(1, 3, *size) * 255


def _run_onnx(session, image):
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, (torch.from_numpy(a) for a in session.run(None, {"image": image.numpy()}))))


# the NACLIP preset's positional-embedding rule (its interpolation by a scale factor of the grid size) included
DENSE_CASES = {"value": {}, "naclip": {"MODEL__CLIP__POS_EMBED_RESIZE": "scale_factor"}}


@pytest.fixture(scope="module", params=list(DENSE_CASES))
def dense(request, tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(MODEL__CLIP__DENSE_MODE=request.param, **DENSE_CASES[request.param])).eval()
    model.set_vocabulary(VOCAB)
    files = export_model(model, tmp_path_factory.mktemp("dense") / request.param)
    return model, files, ort.InferenceSession(str(files.onnx), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def mask(tmp_path_factory):
    # low thresholds, so that the random model's panoptic output has segments to compare
    cfg = tiny_mask_cfg(MODEL__MASK_SEG__TEST__OBJECT_MASK_THRESHOLD=0.0, MODEL__MASK_SEG__TEST__OVERLAP_THRESHOLD=0.0)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.in_vocab.void_embedding.neg_()  # at random init the queries all lean to void: no segments
    model.set_vocabulary(VOCAB, is_thing=THINGS)
    files = export_model(model, tmp_path_factory.mktemp("mask") / "tiny")
    return model, files, ort.InferenceSession(str(files.onnx), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def mask_program(mask):
    """The mask segmentor's .pt2, reloaded from the file."""
    return torch.export.load(mask[1].program).module()


def test_dense_onnx_equals_pytorch(dense):
    model, files, session = dense
    for i, size in enumerate(SIZES):
        image = _image(size, i)
        with torch.no_grad():
            ref = model([{"image": image[0]}])[0]["sem_seg"]  # (C, H, W)
        out = _run_onnx(session, image)
        assert out["sem_seg"].shape == (1, len(VOCAB), *size)
        torch.testing.assert_close(out["sem_seg"][0], ref, rtol=0, atol=ATOL)
        assert torch.equal(out["labels"][0], ref.argmax(0))


def test_dense_program_reloads_and_runs_at_another_size(dense):
    model, files, _ = dense
    program = torch.export.load(files.program).module()
    image = _image((61, 40), 5)
    with torch.no_grad():
        ref = model([{"image": image[0]}])[0]["sem_seg"]
        scores, labels = program(image)
    torch.testing.assert_close(scores[0], ref, rtol=0, atol=ATOL)
    assert torch.equal(labels[0], ref.argmax(0))


def test_mask_onnx_equals_pytorch(mask):
    model, files, session = mask
    for i, size in enumerate(SIZES):
        image = _image(size, 10 + i)
        with torch.no_grad():
            ref = model([{"image": image[0]}])[0]["sem_seg"]
            padded = model.preprocess([{"image": image[0]}])  # detectron2's ImageList, as forward pads
            text = model.text_embeddings(model.vocabulary)
            core = model.segment(padded.tensor, text.embeds, text.owner, padded.image_sizes)
        out = _run_onnx(session, image)
        torch.testing.assert_close(out["sem_seg"][0], ref, rtol=0, atol=ATOL)
        assert torch.equal(out["labels"][0], ref.argmax(0))
        torch.testing.assert_close(out["pred_masks"], core["pred_masks"], rtol=0, atol=ATOL)
        torch.testing.assert_close(out["class_probs"], core["class_probs"], rtol=0, atol=ATOL)


def test_mask_program_reloads_and_runs_at_another_size(mask, mask_program):
    model, program = mask[0], mask_program
    image = _image((70, 52), 3)
    with torch.no_grad():
        ref = model([{"image": image[0]}])[0]["sem_seg"]
        outputs = program(image)
    torch.testing.assert_close(outputs[0][0], ref, rtol=0, atol=ATOL)
    assert torch.equal(outputs[1][0], ref.argmax(0))


def test_panoptic_from_exported_outputs_equals_the_models(mask):
    model, files, session = mask
    info = json.loads(files.metadata.read_text())
    segments_seen = 0
    for i, size in enumerate(SIZES):
        image = _image(size, 20 + i)
        with torch.no_grad():
            ref_map, ref_segments = model([{"image": image[0], "height": 2 * size[0], "width": 2 * size[1]}]
                                          )[0]["panoptic_seg"]
        out = _run_onnx(session, image)
        pan, segments = panoptic_from_outputs(out["class_probs"], out["pred_masks"], size, info["is_thing"],
                                              info["patch_size"], output_size=(2 * size[0], 2 * size[1]),
                                              **info["panoptic"])
        assert torch.equal(pan, ref_map)
        assert [{k: v for k, v in s.items() if k != "score"} for s in segments] == \
            [{k: v for k, v in s.items() if k != "score"} for s in ref_segments]
        assert [s["score"] for s in segments] == pytest.approx([s["score"] for s in ref_segments], abs=ATOL)
        segments_seen += len(segments)
    assert segments_seen > 0  # the comparison saw segments


def test_metadata_names_the_baked_vocabulary(mask, mask_program):
    _, files, session = mask
    info = json.loads(files.metadata.read_text())
    assert info["classes"] == ["cat", "dog", "sky", "grass"] and info["synonyms"][1] == ["dog", "puppy"]
    assert info["is_thing"] == THINGS
    assert info["outputs"] == [o.name for o in session.get_outputs()]
    assert info["panoptic"] == {"object_mask_threshold": 0.0, "overlap_threshold": 0.0}
    # the program checks its size range: below the minimum is refused, not silently wrong
    with pytest.raises(Exception, match="size"):
        mask_program(_image((info["min_size"][0] - 1, 64), 0))


def test_bicubic_matrix_is_torchs_scale_factor_interpolation():
    # the traced form of the "scale_factor" rule (SCLIP / ClearCLIP / NACLIP) against F.interpolate itself
    grid = torch.randn(1, 5, 14, 14)
    for n, m in [(1, 30), (3, 14), (14, 5), (41, 20)]:
        ref = F.interpolate(grid, scale_factor=((n + 0.1) / 14, (m + 0.1) / 14), mode="bicubic", align_corners=False)
        out = torch.einsum("yh,bchw,xw->bcyx", bicubic_matrix(n, 14, 14 / (n + 0.1)), grid,
                           bicubic_matrix(m, 14, 14 / (m + 0.1)))
        torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


def test_slide_inference_and_other_models_are_refused():
    model = build_model(tiny_cfg(MODEL__DENSE_SEG__INFERENCE_MODE="slide")).eval()
    model.set_vocabulary(VOCAB)
    with pytest.raises(ValueError, match="INFERENCE_MODE"):
        export_module(model)
    with pytest.raises(TypeError, match="cannot be exported"):
        export_module(torch.nn.Linear(2, 2))


def test_cli_writes_the_program_for_a_config_file(tmp_path):
    spec = importlib.util.spec_from_file_location("export_cli", Path(__file__).parents[1] / "tools" / "export.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cfg = tiny_cfg()
    path = tmp_path / "tiny.yaml"
    path.write_text(cfg.dump())
    report = cli.main(["--config", str(path), "--vocab", "cat,dog", "--output", str(tmp_path / "out" / "m"),
                   "--no-onnx", "MODEL.CLIP.DENSE_MODE", "value"])
    assert (tmp_path / "out" / "m.pt2").is_file() and not (tmp_path / "out" / "m.onnx").exists()
    assert json.loads((tmp_path / "out" / "m.json").read_text())["classes"] == ["cat", "dog"]
    assert report["program_bytes"] > 0


def test_cli_check_flag_leaves_the_overrides_to_the_config():
    # README's command: `--check MODEL.DENSE_SEG.INFERENCE_MODE whole` (the overrides after --check)
    spec = importlib.util.spec_from_file_location("export_cli", Path(__file__).parents[1] / "tools" / "export.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = cli.parse_args(["--config", "naclip_vitb16", "--output", "o", "--check",
                           "MODEL.DENSE_SEG.INFERENCE_MODE", "whole"])
    assert args.check and args.check_sizes is None
    assert args.opts == ["MODEL.DENSE_SEG.INFERENCE_MODE", "whole"]
    args = cli.parse_args(["--config", "c", "--output", "o", "--check-sizes", "64x96,32x48", "MODEL.X", "1"])
    assert args.check and args.check_sizes == [(64, 96), (32, 48)] and args.opts == ["MODEL.X", "1"]
