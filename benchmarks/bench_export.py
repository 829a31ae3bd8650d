#!/usr/bin/env python
"""Exported model sizes and their agreement with PyTorch: each case is exported with `ovseg.export` (.pt2 + ONNX,
vocabulary baked in) from random weights (size and agreement do not depend on them), then run by onnxruntime and
as the reloaded program on random images of other sizes than the traced one.

    python benchmarks/bench_export.py                              # ViT-B/16: dense value, dense NACLIP
    python benchmarks/bench_export.py --cases mask                 # the mask segmentor (slow to export)
    python benchmarks/bench_export.py --model ovseg-tiny-ViT-16    # smoke run (tiny random CLIP)

Prints a table and writes benchmarks/results/bench_export.json.
"""
import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name -> (shipped config, overrides); slide inference is not exportable for any size, hence "whole"
CASES = {
    "dense value": ("clip_dense_vitb16", ["MODEL.CLIP.DENSE_MODE", "value"]),
    "dense naclip": ("naclip_vitb16", ["MODEL.DENSE_SEG.INFERENCE_MODE", "whole", "MODEL.DENSE_SEG.PAMR_ITERS", "0"]),
    # FC-CLIP-sized heads (250 queries, 9 decoder layers) on the CLIP tower
    "mask": ("Base-MaskSeg", []),
}
DEFAULT_CASES = ("dense value", "dense naclip")


def run_case(name: str, model_name: str, classes: int, sizes, out_dir: str) -> dict:
    import torch

    from ovseg.export import compare_with_eager, export_model
    from ovseg.modeling.tiny_models import register_tiny_models
    from ovseg.predictor import Predictor

    register_tiny_models()
    torch.manual_seed(0)
    config, opts = CASES[name]
    opts = opts + ["MODEL.CLIP.MODEL_NAME", model_name, "MODEL.CLIP.PRETRAINED", "", "MODEL.TEXT.TEMPLATES", "single"]
    predictor = Predictor(config, device="cpu", dtype="fp32", opts=opts,
                          vocabulary=[f"class {i}" for i in range(classes)])
    start = time.perf_counter()
    files = export_model(predictor.model, os.path.join(out_dir, name.replace(" ", "_")), cfg=predictor.cfg)
    seconds = time.perf_counter() - start
    diffs = compare_with_eager(predictor.model, files, sizes)
    return {"case": name, "config": config, "model": model_name, "classes": classes,
            "export_s": round(seconds, 1), "pt2_MiB": round(os.path.getsize(files.program) / 2 ** 20, 2),
            "onnx_MiB": round(os.path.getsize(files.onnx) / 2 ** 20, 2), "min_size": files.info["min_size"],
            "sizes": [list(s) for s in sizes], "max_abs_onnx": diffs["onnx"], "max_abs_pt2": diffs["program"],
            "onnx_labels_equal": diffs["onnx_labels_equal"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ViT-B-16", help="open_clip architecture (random weights)")
    ap.add_argument("--cases", nargs="*", default=list(DEFAULT_CASES), choices=list(CASES))
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--sizes", nargs="*", type=int, default=[224, 304, 250, 333], metavar="H W")
    ap.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "bench_export.json"))
    args = ap.parse_args()
    sizes = [tuple(args.sizes[i:i + 2]) for i in range(0, len(args.sizes), 2)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            rows.append(run_case(name, args.model, args.classes, sizes, tmp))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.model}, {args.classes} classes, images {sizes} (CPU, float32)")
    print("| case | .pt2 MiB | .onnx MiB | max abs ONNX - PyTorch | max abs .pt2 - PyTorch | labels equal | export s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['pt2_MiB']} | {r['onnx_MiB']} | {r['max_abs_onnx']:.2e} | {r['max_abs_pt2']:.2e} | "
              f"{r['onnx_labels_equal']:.4f} | {r['export_s']} |")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
