"""The engine's guarantees (ovseg/engine): exact resume, checkpoint on SIGTERM, atomic / verified / safe checkpoints,
a clear stop on NaN, strict --eval-only weights, one-line user errors, and CPU-only runs (AMP configs, 2 GLOO
processes)."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

from ovseg import engine
from ovseg.config import get_ovseg_cfg
from tests.helpers import free_dist_url
from tests.synthetic_panoptic import make_dataset
from tests.test_mask_segmentor_training import _cfg

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "data", n_train=12, n_val=4)


def _train_cfg(tmp_path, dataset, out, iters, **overrides):
    train, val = dataset
    cfg, _ = _cfg(tmp_path, train, val, iters, OUTPUT_DIR=str(out), DATASETS__TEST="()", **overrides)
    cfg.freeze()
    return cfg


class _Stop(HookBase):
    """Raises `exc` in after_step of iteration `it` (a simulated kill / a simulated blow-up)."""

    def __init__(self, it, action):
        self.it, self.action = it, action

    def after_step(self):
        if self.trainer.iter == self.it:
            self.action(self.trainer)


def _kill(trainer):
    raise KeyboardInterrupt("simulated kill")


def _final_weights(out: Path):
    return torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, dataset, workers):
    # random LSJ crops, random matcher / loss points and 2 epochs of data make every piece of state matter
    kw = dict(SOLVER__CHECKPOINT_PERIOD=3, DATALOADER__NUM_WORKERS=workers)
    full = _train_cfg(tmp_path, dataset, tmp_path / "full", 8, **kw)
    seed_all_rng(0)  # what default_setup does with SEED
    engine.Trainer(full).train()

    part = _train_cfg(tmp_path, dataset, tmp_path / "part", 8, **kw)
    seed_all_rng(0)
    killed = engine.Trainer(part)
    killed.register_hooks([_Stop(6, _kill)])  # after the checkpoint of iteration 5, before 8
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    assert (tmp_path / "part" / "last_checkpoint").read_text() == "model_0000005.pth"
    del killed
    seed_all_rng(123)  # a new process: whatever its seed, the checkpoint decides
    resumed = engine.Trainer(part)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 6
    resumed.train()

    a, b = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "part")
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-7, worst
    # and the run did learn something: the weights moved from the start
    start = torch.load(tmp_path / "full" / "model_0000002.pth", weights_only=True)["model"]
    assert max((a[k].float() - start[k].float()).abs().max().item() for k in a) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_current_iteration(tmp_path, dataset, sig):
    train, val = dataset
    cfg, path = _cfg(tmp_path, train, val, 100000, DATASETS__TEST="()", OUTPUT_DIR=str(tmp_path / "out"))
    driver = _driver(tmp_path, dataset)
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen([sys.executable, str(driver), "--config-file", str(path)], cwd=ROOT, env=ENV,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if "Starting training from iteration" in (tmp_path / "log.txt").read_text():
                break
            time.sleep(0.5)
        time.sleep(3)  # a few iterations in
        proc.send_signal(sig)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (tmp_path / "log.txt").read_text()
    assert rc == 128 + sig, text[-3000:]
    name = (tmp_path / "out" / "last_checkpoint").read_text()
    saved = torch.load(tmp_path / "out" / name, weights_only=True)
    assert name == f"model_{saved['iteration']:07d}.pth"
    assert f"{sig.name} received" in text


def _driver(tmp_path, dataset) -> Path:
    """A train_net.py that first registers the synthetic dataset (in every process `launch` starts)."""
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from tests.synthetic_panoptic import make_dataset\n"
        "from ovseg.engine import run\n"
        f"make_dataset(__import__('pathlib').Path({str(tmp_path / 'data')!r}), n_train=12, n_val=4)\n"
        "if __name__ == '__main__':\n"
        "    run()\n")
    return driver


def test_checkpoints_are_written_atomically_and_verified(tmp_path, monkeypatch, caplog):
    model = torch.nn.Linear(3, 2)
    ckpt = engine.SafeCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000001")
    good = torch.load(tmp_path / "model_0000001.pth", weights_only=True)

    # a kill in the middle of torch.save leaves the previous file untouched and no partial file behind
    def dying_save(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000001")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    torch.testing.assert_close(torch.load(tmp_path / "model_0000001.pth", weights_only=True), good)

    # last_checkpoint naming a truncated / empty file: resume falls back to the newest intact one, with a warning
    ckpt.save("model_0000003")
    for damage in (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), lambda p: p.write_bytes(b"")):
        ckpt.save("model_0000005")
        damage(tmp_path / "model_0000005.pth")
        assert not engine.is_intact_checkpoint(str(tmp_path / "model_0000005.pth"))
        caplog.clear()
        assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000003.pth")
        assert "damaged" in caplog.text
    with torch.no_grad():
        model.weight.zero_()
    ckpt.resume_or_load("", resume=True)
    assert model.weight.abs().sum() > 0


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tiny_eval_model(**overrides):
    from detectron2.modeling import build_model

    from tests.tiny_mask import tiny_mask_cfg

    cfg = tiny_mask_cfg(MODEL__TEXT__VOCABULARY="a,b", **overrides)
    return cfg, build_model(cfg)


def test_hostile_weights_are_refused_and_never_run(tmp_path):
    cfg, model = _tiny_eval_model()
    marker = tmp_path / "pwned"
    pkl, pth = tmp_path / "model.pkl", tmp_path / "model.pth"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {"x": _Hostile(marker)}, "__author__": "me"}, f)
    torch.save({"model": model.state_dict(), "extra": _Hostile(marker)}, pth)
    for path in (pkl, pth):
        cfg.MODEL.WEIGHTS = str(path)
        with pytest.raises(engine.UserError, match="MODEL.TRUST_PICKLED_WEIGHTS True"):
            engine.load_eval_weights(cfg, model)
        assert not marker.exists()
    # the opt-in works (and, as promised, runs the file's code)
    cfg.MODEL.TRUST_PICKLED_WEIGHTS = True
    cfg.MODEL.WEIGHTS = str(pth)
    engine.load_eval_weights(cfg, model)
    assert marker.exists()


def test_eval_only_refuses_weights_that_do_not_fit_and_missing_weights(tmp_path):
    cfg, model = _tiny_eval_model()
    with pytest.raises(engine.UserError, match="only MODEL.WEIGHTS can give.*MODEL.WEIGHTS is empty"):
        engine.load_eval_weights(cfg, model)
    # a checkpoint of a model with 16 queries instead of 8
    _, other = _tiny_eval_model(MODEL__MASK_SEG__DECODER__NUM_QUERIES=16)
    path = tmp_path / "other.pth"
    torch.save({"model": other.state_dict()}, path)
    cfg.MODEL.WEIGHTS = str(path)
    with pytest.raises(engine.UserError, match=r"do not fit the model: .*query.*\(16, 32\) vs model \(8, 32\)"):
        engine.load_eval_weights(cfg, model)
    # a file without the trainable parts (e.g. the CLIP tower only)
    torch.save({"model": {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}}, path)
    with pytest.raises(engine.UserError, match="missing from the file"):
        engine.load_eval_weights(cfg, model)
    # on purpose: allowed
    cfg.MODEL.ALLOW_RANDOM_WEIGHTS = True
    engine.load_eval_weights(cfg, model)
    cfg.MODEL.WEIGHTS = ""
    engine.load_eval_weights(cfg, model)
    # a matching checkpoint loads under the strict rule
    cfg.MODEL.ALLOW_RANDOM_WEIGHTS = False
    torch.save({"model": model.state_dict()}, path)
    cfg.MODEL.WEIGHTS = str(path)
    engine.load_eval_weights(cfg, model)


def _nan_weights(trainer):
    with torch.no_grad():
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.fill_(float("nan"))


def test_nan_stops_with_the_iteration_and_last_good_checkpoint(tmp_path, dataset):
    cfg = _train_cfg(tmp_path, dataset, tmp_path / "out", 8, SOLVER__CHECKPOINT_PERIOD=2)
    trainer = engine.Trainer(cfg)
    trainer.register_hooks([_Stop(2, _nan_weights)])
    with pytest.raises(engine.NonFiniteLossError, match=r"loss is NaN at iteration 3 .*model_0000001\.pth"):
        trainer.train()


def test_shipped_amp_config_trains_on_cpu(tmp_path, dataset, caplog):
    from tests.tiny_mask import tiny_mask_cfg

    train, val = dataset
    cfg = get_ovseg_cfg()
    cfg.merge_from_file(str(ROOT / "configs" / "ade_clipself.yaml"))
    assert cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cuda"
    cfg.MODEL = tiny_mask_cfg().MODEL  # tiny model, the shipped solver (AMP) and everything else
    tiny, _ = _cfg(tmp_path, train, val, 2, OUTPUT_DIR=str(tmp_path / "out"), DATASETS__TEST="()")
    cfg.INPUT, cfg.DATASETS, cfg.DATALOADER = tiny.INPUT, tiny.DATASETS, tiny.DATALOADER
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER, cfg.OUTPUT_DIR = 2, 2, str(tmp_path / "out")
    cfg.MODEL.DEVICE = "cuda"
    cfg = engine.resolve_device(cfg)
    engine.Trainer(cfg).train()
    assert (tmp_path / "out" / "model_final.pth").exists()
    assert caplog.text.count("SOLVER.AMP.ENABLED is ignored") == 1


def _run(*argv, driver=None, timeout=600, env=ENV):
    return subprocess.run([sys.executable, str(driver or ROOT / "train_net.py"), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_gloo_processes_train_and_evaluate_on_cpu(tmp_path, dataset):
    train, val = dataset
    _, path = _cfg(tmp_path, train, val, 3, OUTPUT_DIR=str(tmp_path / "out"), SOLVER__IMS_PER_BATCH=2)
    proc = _run("--config-file", str(path), "--num-gpus", "2", "--dist-url", free_dist_url(),
                driver=_driver(tmp_path, dataset))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "out" / "model_final.pth").exists()
    assert "PQ" in proc.stdout + proc.stderr  # the evaluation at the end of training ran
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.json").read_text().splitlines()]
    assert max(r["iteration"] for r in records if "total_loss" in r) == 2


@pytest.mark.slow
def test_a_ranks_user_error_is_one_line(tmp_path, dataset):
    """With --num-gpus 2 the weights are checked in each rank: the mistake still ends as one line."""
    from detectron2.modeling import build_model

    train, val = dataset
    cfg, path = _cfg(tmp_path, train, val, 3, OUTPUT_DIR=str(tmp_path / "out"))
    other = cfg.clone()
    other.MODEL.MASK_SEG.DECODER.NUM_QUERIES = cfg.MODEL.MASK_SEG.DECODER.NUM_QUERIES * 2
    weights = tmp_path / "other.pth"
    torch.save({"model": build_model(other).state_dict()}, weights)
    proc = _run("--config-file", str(path), "--num-gpus", "2", "--dist-url", free_dist_url(), "--eval-only",
                "MODEL.WEIGHTS", str(weights),
                driver=_driver(tmp_path, dataset))
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the weights do not fit the model"), proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("opts, message", [
    (["SOLVER.BASE_LRR", "0.1"], "unknown config key SOLVER.BASE_LRR (command line); did you mean SOLVER.BASE_LR"),
    (["SOLVER.BASE_LR"], "KEY VALUE pairs; got an odd number (1)"),
    (["DATASETS.TEST", "('ade20k_150_sem_seg_vall',)"], "'ade20k_150_sem_seg_vall' is not registered; did you mean"),
    (["MODEL.WEIGHTS", "{empty}"], "is empty (0 bytes)"),
    (["DATASETS.TEST", "('ade20k_150_sem_seg_val',)"], "label folder not found at"),
])
def test_user_errors_are_one_line(tmp_path, opts, message):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    opts = [o.format(empty=empty) for o in opts]
    env = dict(ENV, DETECTRON2_DATASETS=str(tmp_path / "nowhere"))
    proc = _run("--config-file", "configs/clip_dense_vitb16.yaml", "--eval-only", *opts, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, proc.stderr[-3000:]


def test_unknown_key_in_a_config_file_names_the_file_and_the_closest_keys(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("_BASE_: " + str(ROOT / "configs" / "clip_dense_vitb16.yaml") + "\nSOLVER:\n  MAX_ITERS: 5\n")
    args = engine.default_argument_parser().parse_args(["--config-file", str(path)])
    with pytest.raises(engine.UserError, match=rf"unknown config key SOLVER.MAX_ITERS \({path}\); did you mean "
                                               r"SOLVER.MAX_ITER\b"):
        engine.load_config(args)


def test_eval_only_of_clip_weights_needs_no_model_weights(tmp_path):
    """CLIPSelf's "original" evaluation: unlocked CLIP blocks start from MODEL.CLIP.PRETRAINED, so no MODEL.WEIGHTS
    is needed; with random CLIP weights the same unlocked blocks have nothing to start from."""
    from detectron2.modeling import build_model

    from ovseg.modeling import load_open_clip
    from tests.helpers import TINY_VIT, tiny_cfg

    clip_file = tmp_path / "clip.pt"
    torch.save(load_open_clip(TINY_VIT, "").state_dict(), clip_file)
    cfg = tiny_cfg(MODEL__META_ARCHITECTURE="CLIPSelfDistiller", MODEL__CLIP__UNLOCK_LAST_BLOCKS=1,
                   MODEL__CLIP__PRETRAINED=str(clip_file), MODEL__TEXT__VOCABULARY="a,b")
    model = build_model(cfg)
    assert any(p.requires_grad for p in model.parameters())
    engine.load_eval_weights(cfg, model)  # no error: the CLIP file gave every trainable tensor
    cfg.MODEL.CLIP.PRETRAINED = ""
    with pytest.raises(engine.UserError, match="only MODEL.WEIGHTS can give.*backbone"):
        engine.load_eval_weights(cfg, model)
