#!/usr/bin/env python
"""CLIPSelf distillation speed and memory: one full step of CLIPSelfDistiller (student forward + backward + AdamW,
teacher forward over every crop of the batch in one call) against its two parts timed alone, random weights.

    python benchmarks/bench_clipself.py                          # EVA02-B-16 and ViT-B-16, 1024 input, 2 x 20 crops
    python benchmarks/bench_clipself.py --size 448 --iters 2     # reduced size (CPU)
    python benchmarks/bench_clipself.py --models ovseg-tiny-ViT-16 --size 128 --iters 2   # smoke run

Target: step <= 1.3 x (student forward+backward + batched teacher forward). Each case runs in a fresh subprocess so
its peak memory is its own (GPU: max allocated; CPU: peak RSS above the RSS after the model is built). Prints a
table and writes JSON to benchmarks/results/bench_clipself.json.
"""
import argparse
import copy
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import PeakMemory  # noqa: E402

PARTS = ("step", "student", "teacher")


def run_case(args) -> dict:
    import torch

    from ovseg.data.clipself_mapper import grid_boxes
    from ovseg.modeling import load_open_clip, split_clip
    from ovseg.modeling.backbone import CLIPViTDenseEncoder
    from ovseg.modeling.meta_arch import CLIPSelfDistiller

    torch.manual_seed(0)
    visual, _ = split_clip(load_open_clip(args.model, ""))
    depth = len(CLIPViTDenseEncoder(visual=copy.deepcopy(visual)).tower.blocks)
    unlock = min(args.unlock, depth)
    model = CLIPSelfDistiller(
        backbone=CLIPViTDenseEncoder(visual=visual, unlock_last_blocks=unlock),
        teacher=CLIPViTDenseEncoder(visual=copy.deepcopy(visual), feature_blocks=[0]),
        text_classifier=None, pixel_mean=[122.8, 116.7, 104.1], pixel_std=[68.5, 66.6, 70.3],
    ).to(args.device).train()
    crop = args.crop or model.teacher.tower.native_grid[0] * model.teacher.patch_size
    # square images (the authors pad to 1024 x 1024), a 4 x 5 grid = 20 regions per image
    batch = [{"image": torch.randint(0, 256, (3, args.size, args.size), dtype=torch.uint8),
              "region_boxes": grid_boxes(args.size, args.size, 4, 5)[: args.regions],
              "crops": torch.randint(0, 256, (args.regions, 3, crop, crop), dtype=torch.uint8)}
             for _ in range(args.batch)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    cuda = args.device.startswith("cuda")
    amp = torch.autocast("cuda", dtype=torch.float16) if cuda and args.amp else torch.autocast("cpu", enabled=False)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and args.amp)

    def step():
        with amp:
            loss = model(batch)["loss_clipself"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def student():
        with amp:
            images = model.preprocess(batch)
            feats = model.student_region_features(images, model.region_boxes(batch))
            loss = feats.float().sum()
        loss.backward()
        model.zero_grad(set_to_none=True)

    def teacher():
        with amp:
            model.teacher_embeddings(torch.cat([b["crops"] for b in batch]).to(args.device))

    fn = {"step": step, "student": student, "teacher": teacher}[args.part]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    with PeakMemory(cuda) as mem:
        fn()  # warm-up (allocator growth is part of the peak)
        sync()
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"model": args.model, "part": args.part, "size": args.size, "batch": args.batch, "regions": args.regions,
            "crop": crop, "unlocked_blocks": unlock, "device": args.device, "amp": bool(cuda and args.amp),
            "median_s": times[len(times) // 2], "peak_mib": mem.mib}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["EVA02-B-16", "ViT-B-16"])
    p.add_argument("--size", type=int, default=1024, help="student input side (authors: 1024)")
    p.add_argument("--batch", type=int, default=2, help="images per step (authors: 2 per GPU)")
    p.add_argument("--regions", type=int, default=20, help="regions per image (authors: 20)")
    p.add_argument("--crop", type=int, default=0, help="teacher crop side; 0 = the model's native size")
    p.add_argument("--unlock", type=int, default=12, help="unlocked last blocks (authors: 12 for B/16)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default=None)
    p.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 on GPU (AMP fp16 by default)")
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_clipself.json"))
    args = p.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.part:  # child process: one case
        print(json.dumps(run_case(args)))
        return

    rows = []
    for model in args.models:
        for part in PARTS:
            cmd = [sys.executable, os.path.abspath(__file__), "--model", model, "--part", part, "--size",
                   str(args.size), "--batch", str(args.batch), "--regions", str(args.regions), "--crop",
                   str(args.crop), "--unlock", str(args.unlock), "--iters", str(args.iters), "--device", args.device]
            if not args.amp:
                cmd.append("--no-amp")
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"{model} {part} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = []
    for model in args.models:
        r = {x["part"]: x for x in rows if x["model"] == model}
        ratio = r["step"]["median_s"] / (r["student"]["median_s"] + r["teacher"]["median_s"])
        summary.append({"model": model, "step_s": r["step"]["median_s"], "student_s": r["student"]["median_s"],
                        "teacher_s": r["teacher"]["median_s"], "ratio": ratio, "iters_per_s": 1 / r["step"]["median_s"],
                        "step_peak_mib": r["step"]["peak_mib"], "target_ratio": 1.3, "meets_target": ratio <= 1.3})
    first = rows[0]
    print(f"CLIPSelf step: {first['batch']} images x {first['size']}^2, {first['regions']} regions each, "
          f"crops {first['crop']}^2, last {first['unlocked_blocks']} blocks unlocked, {first['device']}"
          f"{' AMP fp16' if first['amp'] else ' fp32'}, median of {args.iters}")
    print(f"{'model':<22}{'step s':>9}{'student s':>11}{'teacher s':>11}{'ratio':>7}{'it/s':>8}{'peak MiB':>10}")
    for s in summary:
        print(f"{s['model']:<22}{s['step_s']:>9.3f}{s['student_s']:>11.3f}{s['teacher_s']:>11.3f}{s['ratio']:>7.2f}"
              f"{s['iters_per_s']:>8.2f}{s['step_peak_mib']:>10.0f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"cases": rows, "summary": summary}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
