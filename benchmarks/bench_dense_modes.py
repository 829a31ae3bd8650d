#!/usr/bin/env python
"""Cost of the training-free dense modes: time and peak memory of each MODEL.CLIP.DENSE_MODE vs "value", the
dense segmentor vs its encoder alone, whole image vs sliding windows at short sides 448 and 640, 150 vs 847
classes, PAMR on/off. Random weights (cost does not depend on them); random unit text embeddings stand in for
the text tower (its cost is per vocabulary, not per image). Each case runs in its own process so that its peak
memory (CUDA allocator peak, or the process's peak RSS via /proc/self/clear_refs on CPU) is its own.

    python benchmarks/bench_dense_modes.py                         # ViT-B-16, the full grid (GPU recommended)
    python benchmarks/bench_dense_modes.py --quick                 # the reduced CPU grid of the closing note
    python benchmarks/bench_dense_modes.py --model ovseg-tiny-ViT-16 --quick --repeats 1   # smoke run

Prints tables and writes benchmarks/results/bench_dense_modes.json.
"""
import argparse
import json
import multiprocessing as mp
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = ("value", "attention", "sclip", "clearclip", "naclip")


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> None:
    try:  # Linux: "5" resets VmHWM (peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_case(case: dict, model_name: str, device: str, repeats: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F
    from detectron2.modeling import build_model

    from ovseg.config import get_ovseg_cfg

    torch.set_num_threads(threads)
    cfg = get_ovseg_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs", "trainingfree", "naclip_vitb16.yaml"))
    cfg.merge_from_list([
        "MODEL.CLIP.MODEL_NAME", model_name, "MODEL.CLIP.PRETRAINED", "", "MODEL.DEVICE", device,
        "MODEL.CLIP.DENSE_MODE", case["mode"], "MODEL.DENSE_SEG.INFERENCE_MODE", case["inference"],
        "MODEL.DENSE_SEG.PAMR_ITERS", 10 if case["pamr"] else 0, "MODEL.TEXT.VOCABULARY", "a",
    ])
    model = build_model(cfg).eval()
    h = case["short_side"]
    w = h * 4 // 3
    gen = torch.Generator().manual_seed(0)
    image = ((torch.rand(3, h, w, generator=gen) * 255 - model.pixel_mean.cpu()) / model.pixel_std.cpu()).to(device)
    d = model.backbone.embed_dim
    text = F.normalize(torch.randn(case["classes"], d, generator=gen), dim=-1).to(device)
    cuda = device.startswith("cuda")

    def step():
        if case["part"] == "encoder":  # what the segmentor's backbone computes, no classes involved
            if case["inference"] == "whole":
                return model.backbone(model.backbone.pad(image[None]))["clip_dense"]
            padded = model.backbone.pad(image[None])[0]
            return model._window_logits(padded, text[:1])
        return model.segment(image, text, (h, w))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    with torch.no_grad():
        step()  # warm-up (allocator, kernels, caches)
        sync()
        times = []
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss_mib("VmRSS")
            _reset_peak_rss()
        for _ in range(repeats):
            t = time.perf_counter()
            out = step()
            sync()
            times.append(time.perf_counter() - t)
            del out
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _rss_mib("VmHWM") - base
    return dict(case, seconds=min(times), peak_mib=round(peak, 1))


def _child(args, queue):
    queue.put(run_case(*args))


def run_isolated(*args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def grid(quick: bool):
    """Cases: (table, case). The reduced grid keeps the mode comparison and one case per other axis."""
    base = dict(part="segmentor", inference="slide", short_side=448, classes=150, pamr=False)
    cases = []
    for mode in MODES:
        for part in ("encoder", "segmentor"):
            cases.append(("modes", dict(base, mode=mode, part=part)))
    sizes = (448, 640)
    classes = (150, 847)
    for mode in ("value", "naclip"):
        for inference in ("whole", "slide"):
            for s in sizes:
                for c in classes:
                    if quick and (c == 847 and s == 448):
                        continue
                    cases.append(("inference", dict(base, mode=mode, inference=inference, short_side=s, classes=c)))
    for s, c in ((448, 150), (640, 847)):
        for pamr in (False, True):
            cases.append(("pamr", dict(base, mode="naclip", short_side=s, classes=c, pamr=pamr)))
    return cases


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per case (the minimum is reported)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--quick", action="store_true", help="reduced grid (CPU)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_dense_modes.json"))
    args = p.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for table, case in grid(args.quick):
        r = run_isolated(case, args.model, device, args.repeats, args.threads)
        r["table"] = table
        results.append(r)
        print(f"{table:9s} {r['mode']:9s} {r['part']:9s} {r['inference']:5s} {r['short_side']:4d} "
              f"{r['classes']:4d} pamr={int(r['pamr'])}  {r['seconds']:8.3f}s  {r['peak_mib']:8.1f} MiB", flush=True)

    def find(table, **kw):
        return next(r for r in results if r["table"] == table and all(r[k] == v for k, v in kw.items()))

    print(f"\n== dense modes ({args.model}, {device}; slide 224/112, short side 448, 150 classes) ==")
    print(f"{'mode':10s} {'encoder s':>10s} {'x value':>8s} {'segment s':>10s} {'x value':>8s} {'seg/enc':>8s} "
          f"{'seg MiB':>8s} {'x value':>8s}")
    v_enc, v_seg = find("modes", mode="value", part="encoder"), find("modes", mode="value", part="segmentor")
    summary = {}
    for mode in MODES:
        enc, seg = find("modes", mode=mode, part="encoder"), find("modes", mode=mode, part="segmentor")
        row = dict(encoder_ratio=enc["seconds"] / v_enc["seconds"], segment_ratio=seg["seconds"] / v_seg["seconds"],
                   seg_over_encoder=seg["seconds"] / enc["seconds"],
                   memory_ratio=seg["peak_mib"] / max(v_seg["peak_mib"], 1e-6))
        summary[mode] = row
        print(f"{mode:10s} {enc['seconds']:10.3f} {row['encoder_ratio']:8.3f} {seg['seconds']:10.3f} "
              f"{row['segment_ratio']:8.3f} {row['seg_over_encoder']:8.3f} {seg['peak_mib']:8.1f} "
              f"{row['memory_ratio']:8.3f}")
    print("\n== whole vs slide, classes, PAMR (segmentor) ==")
    for r in results:
        if r["table"] != "modes":
            print(f"{r['mode']:7s} {r['inference']:5s} short {r['short_side']:4d} {r['classes']:4d} cls "
                  f"pamr={int(r['pamr'])}  {r['seconds']:8.3f}s  {r['peak_mib']:8.1f} MiB")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(model=args.model, device=device, threads=args.threads, repeats=args.repeats, quick=args.quick,
                       cases=results, mode_ratios=summary), f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
