"""benchmarks/gpu_check.py runs on CPU with tiny towers, reports every case, and its output checks catch bad outputs."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.structures import Instances

REPO = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_check_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(out)],
                          cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    res = json.loads(out.read_text())
    cases = {c["case"]: c for c in res["cases"]}
    towers = ("ovseg-tiny-ViT-16", "ovseg-tiny-EVA02-16")
    archs = ("CLIPDenseSegmentor", "OpenVocabMaskSegmentor", "CLIPSelfDistiller")
    expected = [f"{a} {t} {k}" for t in towers for a in archs for k in ("build", "infer fp32", "infer bf16")]
    expected += [f"{a} {t} train amp x3" for t in towers for a in archs[1:]]
    expected += ["demo scene.jpg --random-init"]
    assert sorted(cases) == sorted(expected)
    # what must work on CPU whatever else is being fixed: building, fp32 inference, AMP training, the demo
    must_pass = [n for n in expected if "infer bf16" not in n]
    assert all(cases[n]["ok"] for n in must_pass), [cases[n] for n in must_pass if not cases[n]["ok"]]
    failed = [c for c in res["cases"] if not c["ok"]]
    assert res["failed"] == len(failed) and res["passed"] == len(res["cases"]) - len(failed)
    assert proc.returncode == (1 if failed else 0), proc.stderr[-2000:]
    assert "passed" in proc.stdout.splitlines()[-1]  # the table is printed last
    assert res["env"]["device"] == "cpu" and res["tiny"]


def test_output_checks_catch_wrong_dtype_shape_and_fields():
    gc = _load_script()
    cpu = torch.device("cpu")
    inputs = [{"height": 6, "width": 8}]
    inst = Instances((6, 8), pred_masks=torch.zeros(2, 6, 8, dtype=torch.bool), scores=torch.ones(2),
                     pred_classes=torch.zeros(2, dtype=torch.long))
    good = [{"sem_seg": torch.zeros(3, 6, 8), "panoptic_seg": (torch.zeros(6, 8, dtype=torch.int32), []),
             "instances": inst}]
    assert gc.check_outputs(good, inputs, cpu, 3) == []
    bad_inst = Instances((6, 8), pred_masks=torch.zeros(2, 5, 8, dtype=torch.bool), scores=torch.ones(2))
    bad = [{"sem_seg": torch.zeros(3, 6, 8, dtype=torch.bfloat16), "panoptic_seg": (torch.zeros(6, 7), None),
            "instances": bad_inst}]
    problems = gc.check_outputs(bad, inputs, cpu, 4)
    assert any("sem_seg dtype" in p for p in problems) and any("sem_seg shape" in p for p in problems)
    assert any("panoptic_seg dtype" in p for p in problems) and any("panoptic_seg shape" in p for p in problems)
    assert any("pred_masks shape" in p for p in problems)
    # a tensor on another device than the model's
    assert any("on cpu" in p for p in gc.check_outputs(good, inputs, torch.device("meta"), 3))


def test_run_case_reports_errors_and_goes_on():
    gc = _load_script()
    results = []
    gc.run_case(results, "boom", lambda: 1 / 0)
    gc.run_case(results, "fine", lambda: "ok")
    assert [r["ok"] for r in results] == [False, True]
    assert results[0]["detail"].startswith("ZeroDivisionError")
