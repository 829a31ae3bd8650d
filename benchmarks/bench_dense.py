#!/usr/bin/env python
"""Speed and memory of the CLIP dense encoder alone vs the whole CLIPDenseSegmentor, fp32 vs bf16 autocast,
and the text classifier's cost on a cache miss vs a hit. Random weights (speed does not depend on them).

    python benchmarks/bench_dense.py                      # ViT-B-16 at short edge 640 (CPU or GPU)
    python benchmarks/bench_dense.py --model ovseg-tiny-ViT-16 --short-edge 128 --iters 2   # smoke run

Each case runs in a fresh subprocess so its peak memory is its own (GPU: max allocated; CPU: peak RSS above the
RSS after the model is built). Prints a table and writes JSON to benchmarks/results/bench_dense.json.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM, the process's peak RSS, so a peak is that of what follows
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(args) -> dict:
    import torch
    from detectron2.modeling import build_model

    from ovseg.config import get_ovseg_cfg

    cfg = get_ovseg_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs", "clip_dense_vitb16.yaml"))
    cfg.MODEL.CLIP.MODEL_NAME = args.model
    cfg.MODEL.CLIP.PRETRAINED = ""
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.TEXT.TEMPLATES = "simple"
    model = build_model(cfg).eval()
    cuda = args.device.startswith("cuda")
    vocab = [f"class {i}" for i in range(args.classes)]
    h, w = args.short_edge, int(round(args.short_edge * 4 / 3))
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8).float().to(args.device)
    inputs = [{"image": image, "height": h, "width": w}]
    normed = ((image - model.pixel_mean) / model.pixel_std)[None]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if args.case == "text":
        with torch.no_grad():
            sync()
            t0 = time.perf_counter()
            model.text_classifier(vocab)
            sync()
            miss = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(args.iters):
                model.text_classifier(vocab)
            sync()
            hit = (time.perf_counter() - t0) / args.iters
        prompts = args.classes * len(model.text_classifier.templates)
        return {"case": "text", "classes": args.classes, "prompts": prompts, "miss_s": miss, "hit_s": hit}

    model.set_vocabulary(vocab)
    with torch.no_grad():
        model.text_classifier(model.vocabulary)  # fill the cache: the image path is what is timed

    def step():
        if args.part == "encoder":
            return model.backbone(normed)["clip_dense"]
        return model(inputs)[0]["sem_seg"]

    dtype = torch.bfloat16 if args.precision == "bf16" else None
    with torch.no_grad(), torch.autocast(device_type="cuda" if cuda else "cpu", dtype=dtype,
                                         enabled=dtype is not None):
        # peaks are taken from before the warm-up: after it, the allocator would reuse the memory it grew
        base = _rss_mib()
        _reset_peak_rss()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base_gpu = torch.cuda.memory_allocated() / 2**20
        step()  # warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step()
        sync()
        seconds = (time.perf_counter() - t0) / args.iters
    peak = (torch.cuda.max_memory_allocated() / 2**20 - base_gpu) if cuda else (_peak_rss_mib() - base)
    return {"case": "image", "part": args.part, "precision": args.precision, "size": f"{h}x{w}",
            "classes": args.classes, "s_per_image": seconds, "images_per_s": 1 / seconds, "peak_extra_mib": peak}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--short-edge", type=int, default=640)
    p.add_argument("--classes", type=int, default=150)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_dense.json"))
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.case:  # child process: one measurement, JSON on the last line
        print(json.dumps(run_case(args)))
        return

    common = ["--model", args.model, "--short-edge", str(args.short_edge), "--classes", str(args.classes),
              "--iters", str(args.iters), "--device", args.device]
    cases = [("image", part, prec) for prec in ("fp32", "bf16") for part in ("encoder", "segmentor")]
    cases.append(("text", "-", "fp32"))
    rows = []
    for case, part, prec in cases:
        cmd = [sys.executable, __file__, *common, "--case", case, "--part", part, "--precision", prec]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(f"  done: {case} {part} {prec}", file=sys.stderr)

    image_rows = [r for r in rows if r["case"] == "image"]
    print(f"\nCLIPDenseSegmentor vs encoder alone: {args.model}, {image_rows[0]['size']}, {args.classes} classes, "
          f"{args.device}, {args.iters} iters")
    print(f"| {'part':<10} | {'precision':<9} | {'s/image':>8} | {'images/s':>8} | {'peak extra MiB':>14} |")
    print(f"|{'-' * 12}|{'-' * 11}|{'-' * 10}|{'-' * 10}|{'-' * 16}|")
    for r in image_rows:
        print(f"| {r['part']:<10} | {r['precision']:<9} | {r['s_per_image']:>8.3f} | {r['images_per_s']:>8.2f} | "
              f"{r['peak_extra_mib']:>14.1f} |")
    ratios = {}
    for prec in ("fp32", "bf16"):
        enc, seg = (next(r for r in image_rows if r["part"] == p and r["precision"] == prec)
                    for p in ("encoder", "segmentor"))
        ratios[prec] = seg["s_per_image"] / enc["s_per_image"]
        print(f"segmentor / encoder time ({prec}): {ratios[prec]:.3f}x")
    fp32 = next(r for r in image_rows if r["part"] == "segmentor" and r["precision"] == "fp32")
    bf16 = next(r for r in image_rows if r["part"] == "segmentor" and r["precision"] == "bf16")
    print(f"bf16 / fp32 segmentor time: {bf16['s_per_image'] / fp32['s_per_image']:.3f}x")
    text = next(r for r in rows if r["case"] == "text")
    print(f"text classifier, {text['classes']} classes x {text['prompts'] // text['classes']} templates: "
          f"miss {text['miss_s']:.3f}s, hit {1e3 * text['hit_s']:.3f}ms ({text['miss_s'] / text['hit_s']:.0f}x)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items() if k not in ("case", "part", "precision")},
                   "rows": rows, "segmentor_over_encoder": ratios}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
