"""The tiny test architectures are registered only when asked for, never as a side effect of importing ovseg."""
import subprocess
import sys
from pathlib import Path

import pytest

from ovseg.modeling.clip_model import load_open_clip
from ovseg.modeling.tiny_models import TINY_MODELS

REPO = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_importing_ovseg_leaves_open_clip_lists_alone():
    # a fresh interpreter: this test process has them registered by conftest
    proc = _run(
        "import open_clip, timm\n"
        "before = set(open_clip.list_models()), set(timm.list_models())\n"
        "import ovseg, ovseg.modeling, ovseg.engine, ovseg.predictor, ovseg.data, ovseg.evaluation\n"
        "after = set(open_clip.list_models()), set(timm.list_models())\n"
        "print(sorted(after[0] - before[0]), sorted(after[1] - before[1]))\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[] []"


def test_naming_a_tiny_model_registers_it():
    proc = _run(
        "import open_clip\n"
        "from ovseg.modeling import load_open_clip\n"
        f"m = load_open_clip({TINY_MODELS[1]!r}, '')\n"
        f"print({TINY_MODELS[1]!r} in open_clip.list_models(), type(m).__name__)\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0] == "True"


def test_unknown_name_says_how_to_register_the_tiny_ones():
    with pytest.raises(ValueError, match=r"register_tiny_models\(\)") as err:
        load_open_clip("ovseg-tiny-ViT-99", "")
    assert all(name in str(err.value) for name in TINY_MODELS)
