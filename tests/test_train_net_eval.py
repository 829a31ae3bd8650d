"""train_net.py --eval-only end to end: a table-registered benchmark, two GLOO processes vs one in-process run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import free_dist_url, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]


def make_fake_ade150(root: Path, n: int = 4):
    """A miniature of ADE20K-150 in its prepared layout (labels 0..149, 255 = ignore)."""
    img_dir = root / "ADEChallengeData2016" / "images" / "validation"
    gt_dir = root / "ADEChallengeData2016" / "annotations_detectron2" / "validation"
    img_dir.mkdir(parents=True)
    gt_dir.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        label = np.full((48, 64), 255, np.uint8)
        label[:, :32] = rng.integers(0, 150)
        label[:, 32:] = rng.integers(0, 150)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3)).astype(np.uint8)).save(img_dir / f"ADE_val_{i:08d}.jpg")
        Image.fromarray(label).save(gt_dir / f"ADE_val_{i:08d}.png")


@pytest.mark.slow
def test_eval_only_two_processes_equals_one(tmp_path, tiny_clip):
    from detectron2.modeling import build_model

    from ovseg import engine as train_net
    from ovseg.data import register_all_ovseg_datasets

    make_fake_ade150(tmp_path / "data")
    weights = tmp_path / "tiny_clip.pt"
    torch.save(tiny_clip(seed=4).state_dict(), weights)
    opts = ["MODEL.CLIP.MODEL_NAME", "ovseg-tiny-ViT-16", "MODEL.CLIP.PRETRAINED", str(weights),
            "MODEL.DEVICE", "cpu", "MODEL.TEXT.TEMPLATES", "single", "INPUT.MIN_SIZE_TEST", "48",
            "DATASETS.TEST", "('ade20k_150_sem_seg_val',)", "DATALOADER.NUM_WORKERS", "0"]
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "data"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "train_net.py", "--config-file", "configs/clip_dense_vitb16.yaml", "--eval-only",
         "--num-gpus", "2", "--dist-url", free_dist_url(), *opts, "OUTPUT_DIR", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = torch.load(tmp_path / "out" / "inference" / "ade20k_150_sem_seg_val" / "sem_seg_evaluation.pth",
                     weights_only=False)

    register_all_ovseg_datasets(str(tmp_path / "data"))
    try:
        cfg = tiny_cfg(OUTPUT_DIR=str(tmp_path / "one"))
        cfg.merge_from_list(opts)
        one = train_net.Trainer.test(cfg, build_model(cfg).eval())["ade20k_150_sem_seg_val"]["sem_seg"]
    finally:
        register_all_ovseg_datasets()
    assert "mIoU" in proc.stdout + proc.stderr
    for key in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert two[key] == pytest.approx(one[key], abs=1e-6)


def test_unregistered_test_dataset_is_a_clear_error(tmp_path):
    from detectron2.modeling import build_model

    from ovseg import engine as train_net

    cfg = tiny_cfg(OUTPUT_DIR=str(tmp_path), MODEL__TEXT__VOCABULARY="a,b")
    cfg.DATASETS.TEST = ("no_such_dataset_val",)
    with pytest.raises(KeyError, match="no_such_dataset_val.*not registered"):
        train_net.Trainer.test(cfg, build_model(cfg))


def test_eval_all_runs_shipped_cuda_config_on_cpu(tmp_path, tiny_clip, monkeypatch):
    """tools/eval_all.py with a shipped config (MODEL.DEVICE cuda) on a machine without CUDA: no extra options."""
    import importlib.util

    from ovseg.data import register_all_ovseg_datasets

    spec = importlib.util.spec_from_file_location("eval_all", ROOT / "tools" / "eval_all.py")
    eval_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_all)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU-only machine, even on a GPU one
    make_fake_ade150(tmp_path / "data")
    weights = tmp_path / "tiny_clip.pt"
    torch.save(tiny_clip(seed=4).state_dict(), weights)
    register_all_ovseg_datasets(str(tmp_path / "data"))
    try:
        scores = eval_all.main([
            "--config-file", str(ROOT / "configs" / "clip_dense_vitb16.yaml"), "--columns", "A-150",
            "--output", str(tmp_path / "results"), "MODEL.CLIP.MODEL_NAME", "ovseg-tiny-ViT-16",
            "MODEL.CLIP.PRETRAINED", str(weights), "MODEL.TEXT.TEMPLATES", "single", "INPUT.MIN_SIZE_TEST", "48",
            "DATALOADER.NUM_WORKERS", "0"])
    finally:
        register_all_ovseg_datasets()
    details = json.loads((tmp_path / "results" / "results.json").read_text())["details"]["A-150"]
    assert isinstance(scores.get("A-150"), float), details
    assert scores["A-150"] == details["results"]["sem_seg"]["mIoU"]
