"""MODEL.INFERENCE_DTYPE: the dtype rule, fp32 vs bf16 agreement on the tiny models (CPU autocast), and every
front-end (Predictor, demo, train_net.py --eval-only's engine, tools/eval_all.py) entering autocast with it."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg import Predictor
from ovseg.utils.precision import resolve_inference_dtype
from tests.helpers import tiny_cfg
from tests.test_train_net_eval import make_fake_ade150
from tests.tiny_mask import tiny_mask_cfg

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "demo" / "examples" / "scene.jpg"
VOCAB = ["sky", "grass|lawn", "house", "tree", "road", "person"]
# fraction of pixels whose class must not change from fp32 to bf16 on random weights: the tiny dense model's
# near-tied random logits give 99.6 % (scene.jpg at 64 px), the mask segmentor 100 %
MIN_AGREEMENT = 0.98


def test_dtype_rule(monkeypatch):
    assert resolve_inference_dtype("fp32", "cpu") == torch.float32
    assert resolve_inference_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_inference_dtype("fp16", "cuda") == torch.float16
    assert resolve_inference_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert resolve_inference_dtype("auto", "cuda:0") == expected
        assert resolve_inference_dtype("auto", "cpu") == torch.float32
    with pytest.raises(ValueError, match="MODEL.INFERENCE_DTYPE='float8'.*auto"):
        resolve_inference_dtype("float8", "cpu")
    with pytest.raises(ValueError, match="INFERENCE_DTYPE='half'"):
        Predictor(tiny_cfg(), dtype="half")  # before the model is built


@pytest.mark.parametrize("make_cfg", [tiny_cfg, tiny_mask_cfg], ids=["dense", "mask"])
def test_bf16_agrees_with_fp32(make_cfg):
    image = np.asarray(Image.open(EXAMPLE).convert("RGB"))
    out = {}
    for dtype in ("fp32", "bf16"):
        torch.manual_seed(0)  # the same random weights in both
        out[dtype] = Predictor(make_cfg(INPUT__MIN_SIZE_TEST=64, INPUT__MAX_SIZE_TEST=1000), dtype=dtype,
                               vocabulary=VOCAB)(image)
    fp32, bf16 = out["fp32"].outputs["sem_seg"], out["bf16"].outputs["sem_seg"]
    assert fp32.dtype == torch.float32
    assert not torch.equal(fp32, bf16.float())  # bf16 really ran
    agreement = (out["fp32"].sem_seg == out["bf16"].sem_seg).double().mean().item()
    assert agreement >= MIN_AGREEMENT, agreement


class AutocastSpy:
    """Stands in for torch.autocast: records (device type, dtype, enabled) of every entry that names a dtype (the
    front-ends' precision; the text encoder's own `autocast(enabled=False)` names none) and runs the real one."""

    def __init__(self):
        self.calls = []

    def __call__(self, device_type, dtype=None, enabled=True, **kw):
        if dtype is not None:
            self.calls.append((device_type, dtype, enabled))
        return torch.amp.autocast(device_type, dtype=dtype, enabled=enabled, **kw)


@pytest.fixture
def spy(monkeypatch):
    s = AutocastSpy()
    monkeypatch.setattr(torch, "autocast", s)
    return s


def test_predictor_and_demo_pass_the_key(spy, tmp_path):
    p = Predictor(tiny_cfg(INPUT__MIN_SIZE_TEST=32), dtype="bf16", vocabulary=["sky", "grass"])
    p(np.zeros((24, 40, 3), np.uint8))
    assert spy.calls == [("cpu", torch.bfloat16, True)]
    sys.path.insert(0, str(ROOT / "demo"))
    try:
        import demo
    finally:
        sys.path.remove(str(ROOT / "demo"))
    tiny = ["--random-init", "--opts", "MODEL.CLIP.MODEL_NAME", "ovseg-tiny-ViT-16", "MODEL.TEXT.TEMPLATES",
            "single", "INPUT.MIN_SIZE_TEST", "32"]
    for flag, expected in ((["--dtype", "fp16"], (torch.float16, True)), ([], (torch.float32, False))):
        spy.calls.clear()
        assert demo.main(["--vocab", "sky", "--input", str(EXAMPLE), *flag, *tiny]) == 0
        assert spy.calls == [("cpu", *expected)]  # the shipped config's default: fp32


@pytest.mark.slow
def test_eval_only_and_eval_all_pass_the_key(spy, tmp_path, tiny_clip, monkeypatch):
    from ovseg import engine
    from ovseg.data import register_all_ovseg_datasets

    make_fake_ade150(tmp_path / "data", n=2)
    weights = tmp_path / "tiny_clip.pt"
    torch.save(tiny_clip(seed=4).state_dict(), weights)
    opts = ["MODEL.CLIP.MODEL_NAME", "ovseg-tiny-ViT-16", "MODEL.CLIP.PRETRAINED", str(weights),
            "MODEL.DEVICE", "cpu", "MODEL.TEXT.TEMPLATES", "single", "INPUT.MIN_SIZE_TEST", "48",
            "DATALOADER.NUM_WORKERS", "0", "MODEL.INFERENCE_DTYPE", "bf16"]
    spec = importlib.util.spec_from_file_location("eval_all", ROOT / "tools" / "eval_all.py")
    eval_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_all)
    register_all_ovseg_datasets(str(tmp_path / "data"))
    try:
        args = engine.default_argument_parser().parse_args(
            ["--config-file", "configs/clip_dense_vitb16.yaml", "--eval-only", *opts,
             "DATASETS.TEST", "('ade20k_150_sem_seg_val',)", "OUTPUT_DIR", str(tmp_path / "out")])
        res = engine.main(args)  # what train_net.py --eval-only runs in each process
        assert "mIoU" in res["ade20k_150_sem_seg_val"]["sem_seg"]
        assert spy.calls == [("cpu", torch.bfloat16, True)]
        spy.calls.clear()
        scores = eval_all.main(["--config-file", "clip_dense_vitb16", "--columns", "A-150", "--output",
                                str(tmp_path / "results"), *opts])
        assert isinstance(scores["A-150"], float)
        assert spy.calls == [("cpu", torch.bfloat16, True)]
    finally:
        register_all_ovseg_datasets()
