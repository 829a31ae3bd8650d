"""benchmarks/gpu_all.py (issue #12's one-slot GPU script) runs end to end on CPU with tiny towers (--smoke)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_all_smoke_on_cpu(tmp_path):
    out = tmp_path / "gpu_all.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_all.py", "--smoke", "--out", str(out), "--label", "t"],
                          cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())["t"]["results"]
    towers = ("ovseg-tiny-ViT-16", "ovseg-tiny-EVA02-16")
    names = ("OpenVocabMaskSegmentor sem+pan+ins", "CLIPDenseSegmentor naclip", "CLIPSelfDistiller train")
    whole = ("OpenVocabMaskSegmentor ViLD sem+pan+ins ovseg-tiny-ViT-16", "CATSegSegmentor slide ovseg-tiny-ViT-16",
             "LSegSegmentor ovseg-tiny-ViT-16", "GroupViTSegmentor")  # the first tower only; GroupViT has its own
    assert sorted(res) == sorted([f"{n} {t}" for n in names for t in towers] + list(whole))
    for key in whole:
        for dtype in ("fp32", "bf16"):
            r = res[key][dtype]
            assert r["counts"]["TOTAL"]["syncs"] <= 3 and abs(r["images_per_s"] * r["ms"] - 1e3) < 1e-6
    for t in towers:
        mask = res[f"OpenVocabMaskSegmentor sem+pan+ins {t}"]
        assert sorted(mask) == ["bf16", "fp32", "train bf16", "train fp32"]
        for dtype in ("fp32", "bf16"):
            r = mask[dtype]
            # every stage timed, and the ratio is what the times say
            assert {"encoder", "pixel decoder", "transformer decoder", "classification", "post-processing/semantic",
                    "post-processing/panoptic", "post-processing/instance"} <= set(r["stages_ms"])
            assert abs(r["whole_over_encoder"] - r["ms"] / r["encoder_alone_ms"]) < 1e-9
            assert r["counts"]["TOTAL"]["syncs"] <= 3 and r["counts"]["TOTAL"]["ops"] > 0
        dense = res[f"CLIPDenseSegmentor naclip {t}"]["bf16"]
        assert abs(dense["images_per_s"] * dense["ms"] - 1e3) < 1e-6 and "pamr" in dense["stages_ms"]
        assert res[f"CLIPSelfDistiller train {t}"]["fp32"]["counts"]["TOTAL"]["syncs"] <= 2 * 3  # batch of 2
