#!/usr/bin/env python
"""Cost of the whole OpenVocabMaskSegmentor vs. its CLIP encoder alone, and of one training iteration.

Random weights (speed does not depend on them). Inference: images at a given short edge (4:3), the encoder alone
(`backbone(images)`: every res* feature and clip_dense) vs. the whole model (encoder, pixel decoder, decoder,
both classifiers with mask pooling, semantic + panoptic post-processing at full resolution). Target: whole /
encoder <= 1.25. Training: one forward + backward + AdamW step at batch 2 (square crops), time and peak memory
(CUDA: max allocated; CPU: growth of the process's peak RSS, a coarse upper bound).

    python benchmarks/bench_mask_segmentor.py                       # GPU if present: fp32 and bf16 at 640
    python benchmarks/bench_mask_segmentor.py --device cpu --short-edge 320 --train-size 320 --iters 3
Prints a table and writes benchmarks/results/bench_mask_segmentor.json.
"""
import argparse
import json
import os
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Instances  # noqa: E402

from ovseg.config import get_ovseg_cfg  # noqa: E402


def build(args, device):
    cfg = get_ovseg_cfg()
    cfg.merge_from_file(args.config)
    cfg.merge_from_list(["MODEL.CLIP.MODEL_NAME", args.model, "MODEL.CLIP.PRETRAINED", "", "MODEL.DEVICE", device,
                         "DATASETS.TRAIN", "()", "DATASETS.TEST", "()", "MODEL.TEXT.TEMPLATES", "single",
                         "MODEL.TEXT.VOCABULARY", ",".join(f"class {i}" for i in range(args.classes)),
                         "MODEL.MASK_SEG.TRAIN_VOCABULARY", ",".join(f"class {i}" for i in range(args.classes))])
    torch.manual_seed(0)
    return build_model(cfg), cfg


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


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

    t_enc = timed(encoder, device, warmup, iters)
    t_all = timed(whole, device, warmup, iters)
    return {"image": [h, w], "encoder_s": t_enc, "segmentor_s": t_all, "ratio": t_all / t_enc}


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
    t = timed(step, device, warmup, iters)
    mem = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb() - rss0
    return {"crop": size, "batch": 2, "step_s": t, "peak_mem_mb": mem,
            "mem_kind": "cuda max allocated" if device == "cuda" else "CPU peak RSS growth"}


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
    ap.add_argument("--out", default="benchmarks/results/bench_mask_segmentor.json")
    args = ap.parse_args()
    dtypes = (args.dtypes or ("fp32,bf16" if args.device == "cuda" else "fp32")).split(",")
    model, cfg = build(args, args.device)
    rows = []
    for dt in dtypes:
        inf = bench_inference(model, args.device, dt, args.short_edge, args.warmup, args.iters)
        tr = bench_train(model, cfg, args.device, dt, args.train_size, args.warmup, args.iters)
        rows.append({"dtype": dt, **inf, **{f"train_{k}": v for k, v in tr.items()}})
    header = f"{'dtype':6} {'image':>10} {'encoder ms':>11} {'whole ms':>9} {'ratio':>6} {'train crop':>10} " \
             f"{'step ms':>8} {'peak MB':>8}"
    print(f"OpenVocabMaskSegmentor, {args.model} (random weights), {cfg.MODEL.MASK_SEG.DECODER.NUM_QUERIES} queries, "
          f"{args.classes} classes, device {args.device}, threads {torch.get_num_threads()}")
    print(header)
    for r in rows:
        print(f"{r['dtype']:6} {'x'.join(map(str, r['image'])):>10} {1000 * r['encoder_s']:11.1f} "
              f"{1000 * r['segmentor_s']:9.1f} {r['ratio']:6.2f} {r['train_crop']:>10} "
              f"{1000 * r['train_step_s']:8.1f} {r['train_peak_mem_mb']:8.0f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "config": args.config, "device": args.device,
                   "queries": cfg.MODEL.MASK_SEG.DECODER.NUM_QUERIES, "classes": args.classes,
                   "threads": torch.get_num_threads(), "target_ratio": 1.25, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
