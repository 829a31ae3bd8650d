"""The command-line tools a new user runs first: a mistake ends with one `error: ...` line and status 2, a missing
benchmark is reported as n/a with its reason, and a model's own error is not mistaken for a missing benchmark.
Each tool is run as `python <tool>` would run it (runpy, `__main__`), in process to stay fast."""
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# the tiny random tower in the shipped dense config, the cheapest text prompts, CPU
TINY = ["MODEL.CLIP.MODEL_NAME", "ovseg-tiny-ViT-16", "MODEL.CLIP.PRETRAINED", "", "MODEL.TEXT.TEMPLATES", "single",
        "MODEL.DEVICE", "cpu"]


def run_tool(script: str, argv, monkeypatch, capsys):
    """(exit status, stderr lines) of `python <script> <argv>`; None for a run that returned without exiting."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *argv])
    grad = torch.is_grad_enabled()  # a tool may switch autograd off for its process
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
        code = None
    except SystemExit as e:
        code = e.code
    finally:
        torch.set_grad_enabled(grad)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture
def empty_datasets(tmp_path):
    """The benchmarks registered under an empty root (none has its files), restored afterwards."""
    from ovseg.data import register_all_ovseg_datasets

    register_all_ovseg_datasets(str(tmp_path / "no_data"))
    yield
    register_all_ovseg_datasets()


def test_eval_all_missing_weights_file_is_one_line(tmp_path, monkeypatch, capsys, empty_datasets):
    missing = tmp_path / "model_final.pth"
    code, err = run_tool("tools/eval_all.py", [
        "--columns", "A-150", "--config-file", "clip_dense_vitb16", "--output", str(tmp_path / "res"), *TINY,
        "MODEL.WEIGHTS", str(missing)], monkeypatch, capsys)
    assert code == 2
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and str(missing) in errors[0] and "MODEL.WEIGHTS" in errors[0], err
    assert "Traceback" not in "\n".join(err)


def test_eval_all_model_error_is_not_reported_as_missing_data(tmp_path, monkeypatch, capsys, empty_datasets):
    # the tiny tower has 3 blocks: block 5 cannot feed the model, whatever the benchmark
    code, err = run_tool("tools/eval_all.py", [
        "--columns", "A-150", "VOC", "--config-file", "clip_dense_vitb16", "--output", str(tmp_path / "res"), *TINY,
        "MODEL.CLIP.FEATURE_BLOCKS", "[5]"], monkeypatch, capsys)
    assert code == 2
    assert err[-1].startswith("error:") and "FEATURE_BLOCKS" in err[-1], err
    assert not (tmp_path / "res" / "results.json").exists()  # no table of n/a for a broken model


def test_eval_all_says_why_a_benchmark_is_na(tmp_path, monkeypatch, capsys, empty_datasets):
    code, err = run_tool("tools/eval_all.py", [
        "--columns", "A-150", "--config-file", "clip_dense_vitb16", "--output", str(tmp_path / "res"), *TINY],
        monkeypatch, capsys)
    assert code == 0
    reason = json.loads((tmp_path / "res" / "results.json").read_text())["details"]["A-150"]["error"]
    assert "prepare_ade20k_150.py" in reason
    shown = [line for line in err if line.startswith("[eval_all] A-150: n/a")]
    assert len(shown) == 1 and reason.split(": ", 1)[1] in shown[0], err


def test_export_missing_weights_is_one_line(tmp_path, monkeypatch, capsys):
    code, err = run_tool("tools/export.py", [
        "--config", "naclip_vitb16", "--vocab", "cat,dog", "--output", str(tmp_path / "m"),
        "--weights", str(tmp_path / "missing.pth"), *TINY], monkeypatch, capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and "missing.pth" in err[0], err


def test_export_slide_inference_is_one_line(tmp_path, monkeypatch, capsys):
    # naclip_vitb16 slides windows: export needs INFERENCE_MODE whole, and says so
    code, err = run_tool("tools/export.py", [
        "--config", "naclip_vitb16", "--vocab", "cat,dog", "--output", str(tmp_path / "m"), "--no-onnx", *TINY],
        monkeypatch, capsys)
    assert code == 2
    assert err[-1].startswith("error:") and "INFERENCE_MODE whole" in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_convert_missing_input_names_the_flag(tmp_path, monkeypatch, capsys):
    code, err = run_tool("scripts/convert_to_open_clip.py", [
        "--model-name", "ovseg-tiny-ViT-16", "--input", str(tmp_path / "model_final.pth"),
        "--output", str(tmp_path / "out.pt")], monkeypatch, capsys)
    assert code == 2
    assert err[-1].endswith(f"error: --input {tmp_path / 'model_final.pth'}: no such file"), err
    assert not (tmp_path / "out.pt").exists()


def test_convert_key_mismatches_name_the_input_flag(tmp_path, monkeypatch, capsys):
    # the user gave --input, not a config key: the error names what they typed
    other = tmp_path / "other.pt"
    torch.save({"backbone.conv.weight": torch.zeros(3)}, other)
    code, err = run_tool("scripts/convert_to_open_clip.py", [
        "--model-name", "ovseg-tiny-ViT-16", "--input", str(other), "--output", str(tmp_path / "out.pt")],
        monkeypatch, capsys)
    assert code == 2 and len([line for line in err if line.startswith("error:")]) == 1, err
    assert err[-1].startswith(f"error: --input {str(other)!r} has none of the keys"), err
    assert "MODEL.CLIP.PRETRAINED" not in "\n".join(err) and not (tmp_path / "out.pt").exists()


def test_train_net_takes_a_shipped_config_name(monkeypatch, capsys, empty_datasets):
    from ovseg.engine import load_config_file, run
    from ovseg.utils.paths import PACKAGE_DIR

    # the config is found by name: the run gets as far as the benchmark the config names, which has no files here
    path = PACKAGE_DIR / "configs" / "trainingfree" / "naclip" / "ade20k.yaml"
    dataset = load_config_file(str(path), warn=False).DATASETS.TEST[0]
    with pytest.raises(SystemExit) as e:
        run(["--config-file", "naclip/ade20k", "--eval-only", *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith(f"error: dataset {dataset!r}"), err
    with pytest.raises(SystemExit) as e:  # a name two shipped configs share: one line asking for the folder
        run(["--config-file", "ade20k", "--eval-only"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: config name 'ade20k' is ambiguous"), err


def test_import_shows_no_dependency_deprecation_warnings(tmp_path):
    # every command imports ovseg: fvcore's and detectron2's torch.jit.script calls warned twice per command; a user's
    # own torch.jit.script call afterwards still warns (the filter covers those imports only)
    code = ("import sys, torch\n"
            "import ovseg\n"
            "print('--- after import', file=sys.stderr, flush=True)\n"
            "def f(x: torch.Tensor) -> torch.Tensor:\n"
            "    return x + 1\n"
            "torch.jit.script(f)\n")
    (tmp_path / "user.py").write_text(code)  # torch.jit.script reads the function's source
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="default", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(tmp_path / "user.py")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    during, after = proc.stderr.split("--- after import")
    assert "torch.jit.script` is deprecated" not in during, during
    assert "torch.jit.script` is deprecated" in after, after


def _folder_dataset(root: Path) -> Path:
    """A `folder:` dataset of two 32x32 images with two classes."""
    from PIL import Image

    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("road\ntree\n")
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(np.full((32, 32), i, np.uint8)).save(root / "labels" / f"{i}.png")
    return root


def test_train_net_model_config_mistake_is_one_line():
    # train_net.py prints a UserError as one line (run()); the model's own ValueError was a 30-line traceback
    from ovseg.engine import Trainer, UserError
    from tests.helpers import tiny_cfg

    expected = "^CLIPDenseSegmentor cannot be built from this config: MODEL.CLIP.FEATURE_BLOCKS"
    with pytest.raises(UserError, match=expected):
        Trainer.build_model(tiny_cfg(MODEL__CLIP__FEATURE_BLOCKS="[5]"))  # the tiny tower has 3 blocks


def test_train_net_unreachable_clip_weights_are_one_line(monkeypatch):
    import detectron2.engine.defaults

    from ovseg.engine import Trainer, UserError
    from ovseg.utils.download import WeightsUnavailableError
    from tests.helpers import tiny_cfg

    def offline(cfg):  # what building any model does on a machine without the weights
        raise WeightsUnavailableError("Could not get the 'ViT-B-16' weights 'openai': set MODEL.CLIP.PRETRAINED")

    monkeypatch.setattr(detectron2.engine.defaults, "build_model", offline)
    with pytest.raises(UserError, match="MODEL.CLIP.PRETRAINED"):
        Trainer.build_model(tiny_cfg())


def test_catseg_parity_without_their_code_is_one_line(tmp_path, monkeypatch, capsys):
    code, err = run_tool("tools/catseg_parity.py", [str(tmp_path)], monkeypatch, capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path}: neither a CAT-Seg checkout"), err


def test_eval_all_config_mistakes_are_one_line(tmp_path, monkeypatch, capsys, empty_datasets):
    base = ["--columns", "A-150", "--config-file", "clip_dense_vitb16", "--output", str(tmp_path / "res")]
    for opts, expected in [
        (["MODEL.CLIP.MODEL_NAM", "ovseg-tiny-ViT-16"], "error: unknown config key MODEL.CLIP.MODEL_NAM"),
        (["MODEL.CLIP.MODEL_NAME"], "error: config overrides come in KEY VALUE pairs"),
        # the columns choose the benchmark: an override would silently evaluate one dataset under every column
        ([*TINY, "DATASETS.TEST", "('ade20k_150_sem_seg_val',)"], "error: eval_all sets DATASETS.TEST per column"),
    ]:
        code, err = run_tool("tools/eval_all.py", [*base, *opts], monkeypatch, capsys)
        assert code == 2 and err[-1].startswith(expected), (opts, err)
        assert not any("Traceback" in line for line in err)


def test_eval_all_registers_a_folder_training_set(tmp_path, monkeypatch, capsys, empty_datasets):
    # CAT-Seg reads its training vocabulary from DATASETS.TRAIN: a folder: name must be registered, as train_net does
    data = _folder_dataset(tmp_path / "train")
    code, err = run_tool("tools/eval_all.py", [
        "--columns", "A-150", "--config-file", "catseg_vitb16_coco_stuff", "--output", str(tmp_path / "res"), *TINY,
        "MODEL.CLIP.FEATURE_BLOCKS", "[0, 1]", "MODEL.ALLOW_RANDOM_WEIGHTS", "True",
        "DATASETS.TRAIN", f"('folder:{data}',)"], monkeypatch, capsys)
    assert code == 0, err
    assert any(line.startswith("[eval_all] A-150: n/a (dataset 'ade20k_150_sem_seg_val'") for line in err), err


def test_missing_weights_suggest_the_configs_output_dir(tmp_path, capsys, monkeypatch):
    # the config's OUTPUT_DIR (output/<config name>) is where its training wrote model_final.pth
    from ovseg.engine import run

    monkeypatch.chdir(tmp_path)
    data = _folder_dataset(tmp_path / "val")
    (tmp_path / "output" / "ade_clipself").mkdir(parents=True)
    (tmp_path / "output" / "ade_clipself" / "model_final.pth").write_bytes(b"x")
    with pytest.raises(SystemExit) as e:
        run(["--config-file", "ade_clipself", "--eval-only", *TINY, "DATASETS.TEST", f"('folder:{data}',)",
             "MODEL.WEIGHTS", "output/model_final.pth"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: MODEL.WEIGHTS='output/model_final.pth'"), err
    assert err[-1].endswith("did you mean output/ade_clipself/model_final.pth (the config's OUTPUT_DIR)?"), err
