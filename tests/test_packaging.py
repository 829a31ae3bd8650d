"""The package as users install it: configs and class lists are package data, so a shipped config resolves by name
and its `ovseg://` class list loads from outside the source checkout."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# run in a fresh interpreter whose working directory is outside the checkout
SCRIPT = r"""
import json, sys
import numpy as np
import ovseg
from ovseg import Predictor
p = Predictor("naclip/voc21", device="cpu", opts=["MODEL.CLIP.MODEL_NAME", "ovseg-tiny-ViT-16",
              "MODEL.CLIP.PRETRAINED", "", "MODEL.TEXT.TEMPLATES", "single", "INPUT.MIN_SIZE_TEST", "32"])
out = p(np.zeros((24, 40, 3), np.uint8))
print(json.dumps({"ovseg": ovseg.__file__, "config": str(p.config_path), "spec": p.cfg.MODEL.TEXT.VOCABULARY,
                  "names": p.vocabulary.names, "shape": list(out.sem_seg.shape)}))
"""


@pytest.mark.slow
def test_installed_package_resolves_shipped_config_and_class_list(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    shutil.copytree(ROOT / "ovseg", src / "ovseg", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-cache-dir", "--target", str(target), str(src)], check=True, capture_output=True,
                   timeout=120)
    shutil.rmtree(src)  # nothing may be read from the copy: only the installed files are left
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=elsewhere, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin",
                                            "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(res["ovseg"]).is_relative_to(target)
    assert Path(res["config"]) == target / "ovseg" / "configs" / "trainingfree" / "naclip" / "voc21.yaml"
    assert res["spec"] == "ovseg://data/class_lists/authors/sclip/cls_voc21.txt"
    # the vocabulary is the shipped file's first names, read here independently from the checkout
    lines = (ROOT / "ovseg/data/class_lists/authors/sclip/cls_voc21.txt").read_text(encoding="utf-8-sig").splitlines()
    expected = [ln.split("#")[0].strip().split("|")[0].strip() for ln in lines if ln.split("#")[0].strip()]
    assert res["names"] == expected and len(expected) == 21
    assert res["shape"] == [24, 40]
    # every shipped yaml and class list made it into the install
    for folder, pattern in (("configs", "*.yaml"), ("data/class_lists", "*.*")):
        shipped = {p.relative_to(ROOT / "ovseg") for p in (ROOT / "ovseg" / folder).rglob(pattern)}
        installed = {p.relative_to(target / "ovseg") for p in (target / "ovseg" / folder).rglob(pattern)}
        assert shipped and shipped == installed, folder
