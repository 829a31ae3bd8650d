#!/usr/bin/env python
"""Cost of the whole OpenVocabMaskSegmentor vs. its CLIP encoder alone, and of one training iteration.

Random weights (speed does not depend on them). Inference: images at a given short edge (4:3), the encoder alone
(`backbone(images)`: every res* feature and clip_dense) vs. the whole model (encoder, pixel decoder, decoder,
both classifiers with mask pooling, the outputs the config turns on, at full resolution). The two are timed
alternately, so that load from other processes hits both alike; the ratio is the median of the per-iteration
ratios. Target: whole / encoder <= 1.25. Random weights make no query confident, so panoptic inference would
keep none: `--kept-queries K` makes K queries confident in a class (a trained model keeps tens per image).
Training: one forward + backward + AdamW step at batch 2 (square crops), time and peak memory (CUDA: max
allocated; CPU: growth of the process's peak RSS, a coarse upper bound).

On CPU, glibc hands every block above 32 MB back to the system when it is freed, so each image pays page
faults again for its large tensors (the stride-4 maps, the full-resolution outputs); CUDA's caching allocator
reuses them. The CPU run is therefore made twice: with glibc's defaults, and in a child process whose glibc
keeps freed memory (GLIBC_TUNABLES, `CACHED_MALLOC` below), which is what the compute costs alone.

    python benchmarks/bench_mask_segmentor.py                       # GPU if present: fp32 and bf16 at 640
    python benchmarks/bench_mask_segmentor.py --device cpu --train-size 320 --iters 5
    python benchmarks/bench_mask_segmentor.py --opts MODEL.MASK_SEG.TEST.INSTANCE_ON True   # any config key
Prints a table and writes benchmarks/results/bench_mask_segmentor.json.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Instances  # noqa: E402

from ovseg.config import get_ovseg_cfg  # noqa: E402

CACHED_MALLOC = "glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295"


def malloc_cached() -> bool:
    """Whether this process runs with glibc keeping freed memory (set before the interpreter starts)."""
    return os.environ.get("GLIBC_TUNABLES") == CACHED_MALLOC


def build(args, device):
    cfg = get_ovseg_cfg()
    cfg.merge_from_file(args.config)
    cfg.merge_from_list(["MODEL.CLIP.MODEL_NAME", args.model, "MODEL.CLIP.PRETRAINED", "", "MODEL.DEVICE", device,
                         "DATASETS.TRAIN", "()", "DATASETS.TEST", "()", "MODEL.TEXT.TEMPLATES", "single",
                         "MODEL.TEXT.VOCABULARY", ",".join(f"class {i}" for i in range(args.classes)),
                         "MODEL.MASK_SEG.TRAIN_VOCABULARY", ",".join(f"class {i}" for i in range(args.classes)),
                         *args.opts])
    torch.manual_seed(0)
    model = build_model(cfg)
    if args.kept_queries:
        make_confident(model, args.kept_queries)
    return model, cfg


def make_confident(model, k):
    """K fixed queries put 0.95 of their probability on one class, as a trained model's segments do."""
    classify = model.class_probabilities
    g = torch.Generator().manual_seed(0)
    queries = torch.randperm(model.transformer_decoder.num_queries, generator=g)[:k]
    classes = torch.randint(0, len(model.vocabulary), (k,), generator=g)

    def confident(*args, **kwargs):
        probs = classify(*args, **kwargs)
        probs[:, queries] *= 0.05
        probs[:, queries, classes] += 0.95
        return probs

    model.class_probabilities = confident


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fns, device, warmup, iters):
    """Median seconds of each function, called in turn each iteration, and the per-iteration times."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync(device)
    times = [[] for _ in fns]
    for _ in range(iters):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times], times


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_inference(model, device, dtype, short_edge, warmup, iters):
    h, w = short_edge, short_edge * 4 // 3
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8).float().to(device)
    amp = torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    model.eval()
    x = ((image - model.pixel_mean) / model.pixel_std)[None]
    x = model.backbone.pad(x)

    def encoder():
        with torch.no_grad(), amp:
            model.backbone(x)

    def whole():
        with torch.no_grad(), amp:
            model([{"image": image, "height": h, "width": w}])

    (t_enc, t_all), (encs, alls) = timed([encoder, whole], device, warmup, iters)
    return {"image": [h, w], "encoder_s": t_enc, "segmentor_s": t_all,
            "ratio": statistics.median(a / e for a, e in zip(alls, encs))}


def bench_train(model, cfg, device, dtype, size, warmup, iters):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    amp = torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    def sample():
        inst = Instances((size, size))
        n = 6
        inst.gt_classes = torch.randint(0, len(model.train_vocabulary), (n,))
        masks = torch.zeros(n, size, size, dtype=torch.bool)
        for i in range(n):
            y, x = torch.randint(0, size // 2, (2,)).tolist()
            masks[i, y:y + size // 3, x:x + size // 3] = True
        inst.gt_masks = BitMasks(masks)
        return {"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8).float(), "instances": inst}

    batch = [sample(), sample()]

    def step():
        with amp:
            losses = model(batch)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.01)
        opt.step()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = peak_rss_mb()
    (t,), _ = timed([step], device, warmup, iters)
    if device == "cuda":
        mem, kind = torch.cuda.max_memory_allocated() / 2**20, "cuda max allocated"
    elif malloc_cached():  # model building's freed memory stays resident
        mem, kind = None, "n/a: glibc keeps freed memory, so RSS growth says nothing"
    else:
        mem, kind = peak_rss_mb() - rss0, "CPU peak RSS growth"
    return {"crop": size, "batch": 2, "step_s": t, "peak_mem_mb": mem, "mem_kind": kind}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/Base-MaskSeg.yaml")
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32,bf16 (default: both on GPU, fp32 on CPU)")
    ap.add_argument("--short-edge", type=int, default=640)
    ap.add_argument("--train-size", type=int, default=1024, help="square training crop (LSJ 1024)")
    ap.add_argument("--classes", type=int, default=150, help="vocabulary size (ADE20K-150)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--kept-queries", type=int, default=50,
                    help="queries made confident, so that panoptic / instance inference has segments (0: none)")
    ap.add_argument("--skip-train", action="store_true", help="inference only")
    ap.add_argument("--cpu-allocator", choices=["default", "cached", "both"], default="both",
                    help="CPU: glibc's defaults, glibc keeping freed memory (a child process), or both")
    ap.add_argument("--out", default="benchmarks/results/bench_mask_segmentor.json")
    ap.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides, KEY VALUE pairs")
    args = ap.parse_args()
    if args.device == "cpu" and args.cpu_allocator == "cached" and not malloc_cached():
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": CACHED_MALLOC})
    dtypes = (args.dtypes or ("fp32,bf16" if args.device == "cuda" else "fp32")).split(",")
    allocator = ("cuda caching" if args.device == "cuda" else
                 "glibc, freed memory kept" if malloc_cached() else "glibc default")
    model, cfg = build(args, args.device)
    rows = []
    for dt in dtypes:
        # training first: its peak-memory figure is growth over the built model, not over an inference peak
        tr = {} if args.skip_train else bench_train(model, cfg, args.device, dt, args.train_size, args.warmup,
                                                      args.iters)
        inf = bench_inference(model, args.device, dt, args.short_edge, args.warmup, args.iters)
        rows.append({"dtype": dt, "allocator": allocator, **inf, **{f"train_{k}": v for k, v in tr.items()}})
    if args.device == "cpu" and args.cpu_allocator == "both":
        child_out = args.out + ".cached.json"
        argv = sys.argv[1:]
        end = argv.index("--opts") if "--opts" in argv else len(argv)  # later flags win; --opts takes the rest
        argv[end:end] = ["--cpu-allocator", "cached", "--out", child_out]
        subprocess.run([sys.executable, __file__, *argv], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "GLIBC_TUNABLES": CACHED_MALLOC})
        with open(child_out) as f:
            rows += json.load(f)["rows"]
        os.remove(child_out)
    header = (f"{'dtype':6} {'allocator':>24} {'image':>10} {'encoder ms':>11} {'whole ms':>9} {'ratio':>6} "
              f"{'train crop':>10} {'step ms':>8} {'peak MB':>8}")
    outputs = model.output_tasks(cfg)
    overrides = f", overrides {' '.join(args.opts)}" if args.opts else ""
    print(f"OpenVocabMaskSegmentor, {args.model} (random weights), {cfg.MODEL.MASK_SEG.DECODER.NUM_QUERIES} queries "
          f"({args.kept_queries} confident), {args.classes} classes, outputs {'+'.join(outputs)}, device "
          f"{args.device}, threads {torch.get_num_threads()}{overrides}")
    print(header)
    for r in rows:
        mem = "-" if r.get("train_peak_mem_mb") is None else f"{r['train_peak_mem_mb']:.0f}"
        train = (f"{r['train_crop']:>10} {1000 * r['train_step_s']:8.1f} {mem:>8}"
                 if "train_crop" in r else f"{'-':>10} {'-':>8} {'-':>8}")
        print(f"{r['dtype']:6} {r['allocator']:>24} {'x'.join(map(str, r['image'])):>10} {1000 * r['encoder_s']:11.1f} "
              f"{1000 * r['segmentor_s']:9.1f} {r['ratio']:6.2f} {train}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "config": args.config, "device": args.device,
                   "queries": cfg.MODEL.MASK_SEG.DECODER.NUM_QUERIES, "kept_queries": args.kept_queries,
                   "classes": args.classes, "outputs": outputs, "overrides": args.opts,
                   "threads": torch.get_num_threads(), "target_ratio": 1.25, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
