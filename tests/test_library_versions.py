"""The declared library ranges (setup.py) hold at their ends: timm / open_clip at the lowest tested versions,
and ground-truth loading under numpy 2.

The other versions are installed with `pip install --target` into a cache folder (OVSEG_TEST_CACHE, default
~/.cache/ovseg-tests) and put first on sys.path of a subprocess; nothing touches the test environment. Without
PyPI the subprocess tests skip, saying so.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg.evaluation import OVSemSegEvaluator, load_sem_seg_gt
from ovseg.modeling.backbone.clip_vit import TIMM_TESTED

REPO = Path(__file__).resolve().parents[1]
LOWEST = ("timm==" + TIMM_TESTED[0], "open_clip_torch==3.0.0")
NUMPY2 = "numpy>=2,<3"


def _cache_root() -> Path:
    return Path(os.environ.get("OVSEG_TEST_CACHE", Path.home() / ".cache" / "ovseg-tests"))


def pip_target(spec: str) -> Path:
    """A folder holding `spec` (no dependencies), installed once and reused; skips the test without PyPI."""
    root = _cache_root()
    target = root / "".join(c if c.isalnum() or c in ".-" else "_" for c in spec)
    if (target / ".complete").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".partial-"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
         "--only-binary=:all:", "--target", str(tmp), spec],
        capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"could not install {spec} from PyPI (unreachable?): {proc.stderr.strip()[-300:]}")
    (tmp / ".complete").touch()
    try:
        tmp.rename(target)
    except OSError:  # another run finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def run_with(paths, script: str, timeout: int = 300) -> str:
    """Run `script` in a fresh interpreter with `paths` first on sys.path (then the repo); returns stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, paths), str(REPO)]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_sem_seg_loader_gives_a_writable_copy(tmp_path):
    labels = np.arange(30 * 20, dtype=np.uint8).reshape(30, 20) % 7
    labels[0, :5] = 255
    Image.fromarray(labels).save(tmp_path / "gt.png")
    for dtype in (int, None):
        gt = load_sem_seg_gt(str(tmp_path / "gt.png"), dtype=dtype)
        assert gt.dtype == (np.dtype(int) if dtype else np.uint8) and gt.flags.writeable
        np.testing.assert_array_equal(gt, labels)
    # the evaluators read ground truth with it
    assert OVSemSegEvaluator.__init__.__kwdefaults__["sem_seg_loading_fn"] is load_sem_seg_gt


@pytest.mark.slow
def test_sem_seg_evaluator_under_numpy2(tmp_path):
    """OVSemSegEvaluator end to end with numpy 2 (where detectron2's default loader raises), against a
    confusion matrix counted here."""
    np2 = pip_target(NUMPY2)
    out = run_with([np2], f"""
        import numpy as np, torch
        assert np.__version__.startswith("2"), np.__version__
        from PIL import Image
        from detectron2.data import DatasetCatalog, MetadataCatalog
        from detectron2.evaluation.sem_seg_evaluation import load_image_into_numpy_array
        from ovseg.evaluation import OVSemSegEvaluator

        rng = np.random.default_rng(0)
        gt = rng.integers(0, 3, (16, 12)).astype(np.uint8)
        gt[:2] = 255
        path = {str(tmp_path / "gt.png")!r}
        Image.fromarray(gt).save(path)
        try:
            load_image_into_numpy_array(path, dtype=int)
            print("detectron2 loader: ok")
        except ValueError:
            print("detectron2 loader: ValueError")
        DatasetCatalog.register("np2_case", lambda: [{{"file_name": "x.jpg", "sem_seg_file_name": path}}])
        MetadataCatalog.get("np2_case").set(stuff_classes=["a", "b", "c"], ignore_label=255,
                                            evaluator_type="sem_seg")
        pred = rng.integers(0, 3, gt.shape)
        ev = OVSemSegEvaluator("np2_case", distributed=False)
        ev.reset()
        ev.process([{{"file_name": "x.jpg", "sem_seg_file_name": path}}],
                   [{{"sem_seg": torch.nn.functional.one_hot(torch.from_numpy(pred), 3).permute(2, 0, 1).float()}}])
        res = ev.evaluate()["sem_seg"]
        valid = gt != 255
        ious = [np.sum((pred == c) & (gt == c) & valid) / np.sum(((pred == c) | (gt == c)) & valid)
                for c in range(3)]
        assert abs(res["mIoU"] - 100 * np.mean(ious)) < 1e-6, (res["mIoU"], ious)
        print("ovseg evaluator: ok", np.__version__)
    """)
    assert "ovseg evaluator: ok 2." in out
    assert "detectron2 loader: ValueError" in out  # the failure this guards against is real here


@pytest.mark.slow
def test_backbone_parity_with_lowest_timm_and_open_clip():
    """tests/test_backbone.py (EVA02 + ViT parity with open_clip/timm's own forward) with the lowest declared
    timm and open_clip; the normal suite covers the installed (highest) ones."""
    paths = [pip_target(spec) for spec in LOWEST]
    out = run_with(paths, f"""
        import sys
        import open_clip, timm
        assert timm.__version__ == {TIMM_TESTED[0]!r}, timm.__version__
        assert open_clip.__version__ == "3.0.0", open_clip.__version__
        import pytest
        code = pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_backbone.py"])
        print("versions", timm.__version__, open_clip.__version__, "exit", int(code))
        sys.exit(int(code))
    """)
    assert f"versions {TIMM_TESTED[0]} 3.0.0 exit 0" in out


def test_tested_ranges_match_setup():
    """setup.py declares the range whose ends are tested here."""
    setup = (REPO / "setup.py").read_text()
    assert f'"timm>={TIMM_TESTED[0]},<1.1"' in setup
    assert '"open_clip_torch>=3.0,<4"' in setup
    import timm

    installed = tuple(int(p) for p in timm.__version__.split(".")[:3])
    assert installed <= tuple(int(p) for p in TIMM_TESTED[1].split(".")), (
        f"timm {timm.__version__} is newer than the tested {TIMM_TESTED[1]}: run the suite and raise TIMM_TESTED")
