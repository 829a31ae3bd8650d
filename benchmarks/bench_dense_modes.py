#!/usr/bin/env python
"""Training-free dense modes: cost of each mode vs "value", whole image vs sliding windows, 150 vs 847 classes,
PAMR on/off, and the authors' inference pipeline (windows merged in image space, one query per synonym: the
presets' default) vs ovseg's former one (windows merged on the patch grid, synonyms averaged). Random weights
(speed does not depend on them); each case in its own process for its peak memory.

    python benchmarks/bench_dense_modes.py                     # ViT-B-16, short sides 448 and 640
    python benchmarks/bench_dense_modes.py --pipelines-only --size 336   # new vs former pipeline (CPU-sized)
    python benchmarks/bench_dense_modes.py --model ovseg-tiny-ViT-16 --iters 1   # smoke run

Prints tables and writes benchmarks/results/bench_dense_modes.json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import PeakMemory  # noqa: E402

MODES = ("value", "attention", "sclip", "clearclip", "naclip")


def run_case(case: dict, model_name: str, iters: int, device: str) -> dict:
    import torch
    from detectron2.modeling import build_model

    from ovseg.config import get_ovseg_cfg

    cfg = get_ovseg_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs", "trainingfree", "naclip_vitb16.yaml"))
    cfg.merge_from_list(["MODEL.CLIP.MODEL_NAME", model_name, "MODEL.CLIP.PRETRAINED", "", "MODEL.DEVICE", device,
                         "MODEL.TEXT.TEMPLATES", "single", "MODEL.CLIP.DENSE_MODE", case["mode"],
                         "MODEL.DENSE_SEG.INFERENCE_MODE", case["inference"],
                         "MODEL.DENSE_SEG.PAMR_ITERS", 10 if case["pamr"] else 0,
                         "MODEL.DENSE_SEG.WINDOW_MERGE", case.get("merge", "image"),
                         "MODEL.DENSE_SEG.SYNONYMS", case.get("synonyms", "max")])
    model = build_model(cfg).eval()
    cuda = device.startswith("cuda")
    h = case["short_side"]
    w = h * 4 // 3
    if case.get("vocabulary"):  # a class-list file (the authors' lists carry synonyms)
        model.set_vocabulary(os.path.join(ROOT, case["vocabulary"]))
    else:
        model.set_vocabulary([f"class {i}" for i in range(case["classes"])])
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8).float().to(device)
    inputs = [{"image": image, "height": h, "width": w}]
    normed = ((image - model.pixel_mean) / model.pixel_std)[None]
    with torch.no_grad():
        model.text_classifier(model.vocabulary)  # cache filled: text encoding is not timed

    def step():
        if case["part"] == "encoder":
            return model.backbone(model.backbone.pad(normed))["clip_dense"]
        return model(inputs)[0]["sem_seg"]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    with torch.no_grad(), PeakMemory(cuda) as mem:
        step()  # warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        sync()
        seconds = (time.perf_counter() - t0) / iters
    return dict(case, size=f"{h}x{w}", s_per_image=seconds, peak_extra_mib=mem.mib)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_dense_modes.json"))
    p.add_argument("--modes-only", action="store_true", help="only the per-mode encoder cases")
    p.add_argument("--pipelines-only", action="store_true", help="only the new-vs-former pipeline cases")
    p.add_argument("--size", type=int, default=448, help="short side of the per-mode encoder cases")
    p.add_argument("--rounds", type=int, default=3,
                   help="the per-mode cases run this many times in turn (one process each); medians reported")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.case:
        print(json.dumps(run_case(json.loads(args.case), args.model, args.iters, args.device)))
        return

    base = dict(part="encoder", inference="whole", short_side=args.size, classes=150, pamr=False)
    cases = [] if args.pipelines_only else [dict(base, mode=m) for m in MODES]
    n_modes = len(cases)
    pipeline_cases = []
    if not args.modes_only:
        seg = dict(base, part="segmentor", mode="naclip")
        voc = "ovseg/data/class_lists/authors/sclip/cls_voc21.txt"  # 21 classes, 56 queries
        for inf, pamr, vocab, classes in (("whole", False, voc, 21), ("slide", False, voc, 21),
                                          ("slide", False, "", 150), ("slide", True, voc, 21)):
            for merge, synonyms in (("image", "max"), ("patch", "mean")):
                pipeline_cases.append(dict(seg, inference=inf, pamr=pamr, vocabulary=vocab, classes=classes,
                                           merge=merge, synonyms=synonyms))
    if not args.modes_only and not args.pipelines_only:
        seg = dict(base, part="segmentor", mode="naclip", short_side=448)
        cases += [dict(seg, inference=inf, short_side=s) for s in (448, 640) for inf in ("whole", "slide")]
        cases += [dict(seg, inference="slide", short_side=640, classes=847),
                  dict(seg, inference="slide", short_side=448, pamr=True)]

    def run(case):
        cmd = [sys.executable, __file__, "--model", args.model, "--iters", str(args.iters), "--device", args.device,
               "--case", json.dumps(case)]
        row = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        print(f"  done: {case}", file=sys.stderr)
        return row

    # modes in turn, round after round, so that drifting load hits every mode alike
    rounds = [[run(case) for case in cases[:n_modes]] for _ in range(args.rounds)]
    rows = [dict(runs[0], s_per_image=statistics.median(r["s_per_image"] for r in runs),
                 peak_extra_mib=max(r["peak_extra_mib"] for r in runs), rounds=[r["s_per_image"] for r in runs])
            for runs in zip(*rounds)]
    rows += [run(case) for case in cases[n_modes:]]
    pipeline_rows = [run(case) for case in pipeline_cases]
    if n_modes:
        print_modes(args, rows, n_modes)
    if pipeline_rows:
        print(f"\nPipelines, NACLIP segmentor ({'whole / slide 224@112'}), {args.model}, {args.device}: the authors' "
              "(image-space merge, max over synonyms) vs ovseg's former (patch-grid merge, synonyms averaged)")
        print(f"| {'size':<9} | {'inference':<9} | {'vocabulary':<22} | {'PAMR':<5} | {'pipeline':<8} | "
              f"{'s/image':>8} | {'peak extra MiB':>14} |")
        print(f"|{'-' * 11}|{'-' * 11}|{'-' * 24}|{'-' * 7}|{'-' * 10}|{'-' * 10}|{'-' * 16}|")
        for r in pipeline_rows:
            vocab = os.path.basename(r["vocabulary"]) if r["vocabulary"] else f"{r['classes']} plain names"
            name = "authors" if r["merge"] == "image" else "former"
            print(f"| {r['size']:<9} | {r['inference']:<9} | {vocab:<22} | {str(r['pamr']):<5} | {name:<8} | "
                  f"{r['s_per_image']:>8.3f} | {r['peak_extra_mib']:>14.1f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "device": args.device, "iters": args.iters, "rows": rows,
                   "pipeline_rows": pipeline_rows}, f, indent=2)
    print(f"wrote {args.out}")


def print_modes(args, rows, n_modes):
    print(f"\nDense modes, {args.model}, encoder alone, whole image {rows[0]['size']}, {args.device}, "
          f"median of {args.rounds} rounds")
    value = rows[0]["s_per_image"]
    print(f"| {'mode':<10} | {'s/image':>8} | {'vs value':>8} | {'peak extra MiB':>14} |")
    print(f"|{'-' * 12}|{'-' * 10}|{'-' * 10}|{'-' * 16}|")
    for r in rows[:n_modes]:
        print(f"| {r['mode']:<10} | {r['s_per_image']:>8.3f} | {r['s_per_image'] / value:>7.3f}x | "
              f"{r['peak_extra_mib']:>14.1f} |")
    print(f"\nNACLIP segmentor (whole / slide 224@112), {args.device}")
    print(f"| {'size':<9} | {'inference':<9} | {'classes':>7} | {'PAMR':<5} | {'s/image':>8} | "
          f"{'peak extra MiB':>14} |")
    print(f"|{'-' * 11}|{'-' * 11}|{'-' * 9}|{'-' * 7}|{'-' * 10}|{'-' * 16}|")
    for r in rows[n_modes:]:
        print(f"| {r['size']:<9} | {r['inference']:<9} | {r['classes']:>7} | {str(r['pamr']):<5} | "
              f"{r['s_per_image']:>8.3f} | {r['peak_extra_mib']:>14.1f} |")


if __name__ == "__main__":
    main()
