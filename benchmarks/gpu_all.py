#!/usr/bin/env python
"""Issue #12's whole table in one process (one short GPU slot): per-stage times, fp32 vs bf16, syncs and op counts.

Random weights, MODEL.CLIP.PRETRAINED "" (speed does not depend on them). For each tower (ViT-B-16, EVA02-B-16):
  - OpenVocabMaskSegmentor, semantic + panoptic + instance, one HxW image (default 640x853), C classes (150),
    K confident queries (50, as a trained model keeps): median whole-model time, per-stage times (preprocess,
    encoder, pixel decoder, transformer decoder, text, classification, post-processing and its semantic / panoptic
    / instance parts), the encoder alone on the same padded image and whole / encoder (target <= 1.25);
  - CLIPDenseSegmentor with the NACLIP preset (configs/trainingfree/naclip_vitb16.yaml: 336 short side, 224 / 112
    windows, PAMR) writing an HxW output: images/s (target >= 40 in bf16);
  - per image, from one torch.profiler forward: host syncs, aten ops, dtype casts (bench_syncs.py's rules);
  - training steps (forward + backward + AdamW, batch 2): the mask segmentor at 1024 and CLIPSelf, time and peak
    memory;
  - on the first tower only, whole-model time and counts of the mask segmentor with ViLD, CAT-Seg (slide), LSeg,
    and GroupViT-S (its own tower);
each in fp32 and under bf16 autocast. Times are CUDA events on a GPU, perf_counter on the CPU.

    source .gpu-bundle/env.sh && python3 benchmarks/gpu_all.py        # GPU machine (../shared/gpu/README.md)
    python benchmarks/gpu_all.py --smoke                              # tiny towers on the CPU: checks the script
Prints the tables last and writes benchmarks/results/gpu_all.json (--out); --label names the run inside it.
"""
import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_syncs  # noqa: E402
from bench_mask_segmentor import bench_train, make_confident  # noqa: E402

import ovseg.modeling.meta_arch.mask_segmentor as mask_module  # noqa: E402

TOWERS = ("ViT-B-16", "EVA02-B-16")
SMOKE_TOWERS = ("ovseg-tiny-ViT-16", "ovseg-tiny-EVA02-16")
# the tiny towers export 2 levels; a small decoder keeps the CPU smoke run short
SMOKE_MASK_OPTS = ["MODEL.MASK_SEG.PIXEL_DECODER.IN_FEATURES", "['res2', 'res2', 'res3', 'res3']",
                   "MODEL.MASK_SEG.DECODER.HIDDEN_DIM", 32, "MODEL.MASK_SEG.DECODER.NUM_QUERIES", 8,
                   "MODEL.MASK_SEG.DECODER.LAYERS", 2, "MODEL.MASK_SEG.DECODER.FFN_DIM", 64,
                   "MODEL.MASK_SEG.PIXEL_DECODER.CONV_DIM", 32, "MODEL.MASK_SEG.PIXEL_DECODER.MASK_DIM", 32,
                   "MODEL.MASK_SEG.PIXEL_DECODER.TRANSFORMER_LAYERS", 1,
                   "MODEL.MASK_SEG.PIXEL_DECODER.TRANSFORMER_FFN_DIM", 64]


class Clock:
    """Timestamps: CUDA events on a GPU (no host wait while the model runs), perf_counter on the CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def staged(owner, attr: str, stage: str, clock: Clock, log: list) -> None:
    """Run `owner.attr` inside a profiler range named after `stage` (bench_syncs.counts reads it) and log its
    start / end timestamps."""
    fn = getattr(owner, attr)

    def run(*args, **kwargs):
        with record_function(bench_syncs.STAGE + stage):
            t0 = clock.now()
            out = fn(*args, **kwargs)
            log.append((stage, t0, clock.now()))
        return out

    setattr(owner, attr, run)


def autocast(device: str, dtype: str):
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def timed_forward(fn, clock: Clock, log: list, warmup: int, iters: int) -> dict:
    """Median ms of `fn()` and of each logged stage (summed per forward)."""
    for _ in range(warmup):
        fn()
    whole, stages = [], {}
    for _ in range(iters):
        log.clear()
        t0 = clock.now()
        fn()
        t1 = clock.now()
        clock.sync()
        whole.append(clock.ms(t0, t1))
        per = {}
        for stage, s, e in log:
            per[stage] = per.get(stage, 0.0) + clock.ms(s, e)
        for stage, ms in per.items():
            stages.setdefault(stage, []).append(ms)
    return {"ms": statistics.median(whole), "stages_ms": {k: statistics.median(v) for k, v in sorted(stages.items())}}


def profiled_counts(fn) -> dict:
    """Per-stage and total syncs / ops / casts of one call of `fn` (bench_syncs' rules)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    table = bench_syncs.counts(prof)
    table["TOTAL"] = {k: sum(r[k] for r in table.values())
                      for k in ("syncs", "ops", "casts", "scalar_casts", "host_only_reads")}
    return table


def mask_case(tower: str, args, clock: Clock) -> dict:
    h, w = args.size
    opts = ["MODEL.MASK_SEG.TRAIN_VOCABULARY", ",".join(f"class {i}" for i in range(args.classes - 1)) + ",background",
            "MODEL.MASK_SEG.TEST.SEMANTIC_ON", "True", "MODEL.MASK_SEG.TEST.PANOPTIC_ON", "True",
            "MODEL.MASK_SEG.TEST.INSTANCE_ON", "True", *(SMOKE_MASK_OPTS if args.smoke else [])]
    model = bench_syncs.build("configs/Base-MaskSeg.yaml", tower, args.device, args.classes, opts)
    make_confident(model, min(args.kept_queries, model.transformer_decoder.num_queries))
    log: list = []
    for attr, stage in (("preprocess", "preprocess"), ("encode", "encoder"), ("text_embeddings", "text"),
                        ("class_probabilities", "classification"), ("postprocess", "post-processing")):
        staged(model, attr, stage, clock, log)
    staged(model.pixel_decoder, "forward", "pixel decoder", clock, log)
    staged(model.transformer_decoder, "forward", "transformer decoder", clock, log)
    for fn, name in (("semantic_inference", "semantic"), ("semantic_labels", "semantic"),
                     ("panoptic_inference", "panoptic"), ("instance_inference", "instance")):
        staged(mask_module, fn, "post-processing/" + name, clock, log)
    image = torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    image = image.to(args.device)
    inputs = [{"image": image, "height": h, "width": w}]
    padded = model.backbone.pad(model.normalize(image)[None])
    out = {}
    for dtype in args.dtypes:
        def whole(dtype=dtype):
            with torch.no_grad(), autocast(args.device, dtype):
                model(inputs)

        def encoder(dtype=dtype):
            with torch.no_grad(), autocast(args.device, dtype):
                model.backbone(padded)

        res = timed_forward(whole, clock, log, args.warmup, args.iters)
        res["encoder_alone_ms"] = timed_forward(encoder, clock, [], args.warmup, args.iters)["ms"]
        res["whole_over_encoder"] = res["ms"] / res["encoder_alone_ms"]
        res["counts"] = profiled_counts(whole)
        out[dtype] = res
    for dtype in args.dtypes:
        out[f"train {dtype}"] = bench_train(model, None, args.device.split(":")[0], dtype, args.train_size,
                                            args.warmup, args.iters)
    return out


def dense_case(tower: str, args, clock: Clock) -> dict:
    h, w = args.size
    # the preset's bicubic scale-factor resize of the position embedding exists for open_clip ViTs only
    opts = [] if "EVA" not in tower else ["MODEL.CLIP.POS_EMBED_RESIZE", "size"]
    model = bench_syncs.build("configs/trainingfree/naclip_vitb16.yaml", tower, args.device, args.classes, opts)
    log: list = []
    staged(model.backbone, "forward", "encoder", clock, log)
    staged(model.pamr, "affinities", "pamr", clock, log)
    staged(model.pamr, "propagate", "pamr", clock, log)
    staged(model, "segment", "segment", clock, log)
    short = args.dense_short_side  # the preset's INPUT.MIN_SIZE_TEST
    image = torch.randint(0, 256, (3, short, round(short * w / h)), generator=torch.Generator().manual_seed(0))
    inputs = [{"image": image.to(torch.uint8).to(args.device), "height": h, "width": w}]
    out = {}
    for dtype in args.dtypes:
        def whole(dtype=dtype):
            with torch.no_grad(), autocast(args.device, dtype):
                model(inputs)

        res = timed_forward(whole, clock, log, args.warmup, args.iters)
        res["images_per_s"] = 1e3 / res["ms"]
        res["counts"] = profiled_counts(whole)
        out[dtype] = res
    return out


# further models, whole-model time only (bench_syncs' builders and stage ranges), on the first tower: the mask
# segmentor with ViLD-image's ensemble, CAT-Seg (its slide protocol), LSeg; GroupViT has its own tower (run once)
WHOLE_MODELS = ("OpenVocabMaskSegmentor ViLD sem+pan+ins", "CATSegSegmentor slide", "LSegSegmentor",
                "GroupViTSegmentor")


def whole_case(name: str, tower: str, args, clock: Clock) -> dict:
    h, w = args.size
    model = bench_syncs.MODELS[name](argparse.Namespace(model=tower, device=args.device, classes=args.classes,
                                                        kept_queries=args.kept_queries))
    image = torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    inputs = [{"image": image.to(args.device), "height": h, "width": w}]
    out = {}
    for dtype in args.dtypes:
        def whole(dtype=dtype):
            with torch.no_grad(), autocast(args.device, dtype):
                model(inputs)

        res = timed_forward(whole, clock, [], args.warmup, args.iters)
        res["images_per_s"] = 1e3 / res["ms"]
        res["counts"] = profiled_counts(whole)
        out[dtype] = res
    return out


def clipself_case(tower: str, args, clock: Clock) -> dict:
    """Training steps of the CLIPSelf distiller (last block unlocked), batch 2, 6 regions per image."""
    cfg_opts = ["MODEL.META_ARCHITECTURE", "CLIPSelfDistiller", "MODEL.CLIP.UNLOCK_LAST_BLOCKS", 1]
    model = bench_syncs.build("configs/Base-OVSeg.yaml", tower, args.device, 3, cfg_opts).train()
    size, crop = args.train_size, args.crop
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0, 0, size / 2, size / 2], [size / 2, 0, size, size / 2], [0, size / 2, size / 2, size],
                          [size / 2, size / 2, size, size], [0, 0, size, size], [size / 4, size / 4, size * 3 / 4,
                                                                                   size * 3 / 4]])
    batch = [{"image": torch.randint(0, 256, (3, size, size), generator=g).float(), "region_boxes": boxes,
              "crops": torch.randint(0, 256, (6, 3, crop, crop), generator=g).float()} for _ in range(2)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    out = {}
    for dtype in args.dtypes:
        def step(update: bool = True, dtype=dtype):
            with autocast(args.device, dtype):
                loss = model(batch)["loss_clipself"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if update:  # AdamW reads its CPU step counters (no device sync): left out of the counts
                opt.step()

        if clock.cuda:
            torch.cuda.reset_peak_memory_stats()
        res = timed_forward(step, clock, [], args.warmup, args.iters)
        res["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20 if clock.cuda else None
        res["counts"] = profiled_counts(lambda: step(update=False))
        out[dtype] = res
    return out


def print_tables(results: dict, args) -> None:
    print(f"\n== {args.label}: {args.device}, {args.size[0]}x{args.size[1]}, {args.classes} classes ==")
    print(f"{'case':44} {'dtype':5} {'ms':>8} {'enc ms':>7} {'ratio':>6} {'img/s':>6} {'syncs':>5} {'ops':>6} "
          f"{'casts':>5}")
    for case, res in results.items():
        if "error" in res:
            print(f"{case:44} ERROR {res['error']}")
            continue
        for dtype, r in res.items():
            if dtype.startswith("train"):
                mem = r.get("peak_mem_mb")
                print(f"{case + ' ' + dtype:50} {r['step_s'] * 1e3:8.1f}  peak MB {mem if mem is None else round(mem)}")
                continue
            t = r["counts"]["TOTAL"]
            enc = r.get("encoder_alone_ms")
            print(f"{case:44} {dtype:5} {r['ms']:8.1f} {enc or 0:7.1f} {r.get('whole_over_encoder', 0):6.2f} "
                  f"{r.get('images_per_s', 0):6.1f} {t['syncs']:5d} {t['ops']:6d} {t['casts']:5d}")
            stages = " / ".join(f"{k} {v:.1f}" for k, v in r["stages_ms"].items())
            print(f"{'':44} {'':5} stages ms: {stages}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny towers, small images, CPU, one iteration")
    ap.add_argument("--device", default=None)
    ap.add_argument("--towers", default=None, help="comma-separated open_clip names")
    ap.add_argument("--size", default=None, help="height,width of the image and outputs (default 640,853)")
    ap.add_argument("--classes", type=int, default=150)
    ap.add_argument("--kept-queries", type=int, default=50)
    ap.add_argument("--dense-short-side", type=int, default=None, help="NACLIP input short side (default 336)")
    ap.add_argument("--train-size", type=int, default=None, help="square training crop (default 1024)")
    ap.add_argument("--crop", type=int, default=None, help="CLIPSelf teacher crop (default 224)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--label", default="current")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu_all.json"))
    args = ap.parse_args(argv)
    s = args.smoke
    args.device = args.device or ("cpu" if s or not torch.cuda.is_available() else "cuda")
    args.towers = (args.towers.split(",") if args.towers else list(SMOKE_TOWERS if s else TOWERS))
    args.size = tuple(int(v) for v in (args.size or ("48,64" if s else "640,853")).split(","))
    args.classes = 5 if s else args.classes
    args.dense_short_side = args.dense_short_side or (32 if s else 336)
    args.train_size = args.train_size or (64 if s else 1024)
    args.crop = args.crop or (32 if s else 224)
    args.warmup = args.warmup if args.warmup is not None else (0 if s else 3)
    args.iters = args.iters or (1 if s else 10)
    args.dtypes = args.dtypes.split(",")
    if any(t.startswith("ovseg-tiny") for t in args.towers):
        from ovseg.modeling.tiny_models import register_tiny_models

        register_tiny_models()
    bench_syncs.count_tolist()
    bench_syncs.mark_host_only()
    clock = Clock(args.device)
    results = {}
    t_start = time.time()
    cases = [(f"{name} {tower}", lambda tower=tower, case=case: case(tower, args, clock))
             for tower in args.towers
             for name, case in (("OpenVocabMaskSegmentor sem+pan+ins", mask_case),
                                ("CLIPDenseSegmentor naclip", dense_case), ("CLIPSelfDistiller train", clipself_case))]
    first = args.towers[0]
    cases += [(f"{name} {first}" if "GroupViT" not in name else name,
               lambda name=name: whole_case(name, first, args, clock)) for name in WHOLE_MODELS]
    for key, case in cases:
        try:
            results[key] = case()
        except Exception as e:  # one failing case must not cost the slot's other numbers
            traceback.print_exc()
            results[key] = {"error": f"{type(e).__name__}: {e}"}
        print(f"[{time.time() - t_start:6.1f} s] {key} done", flush=True)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    previous[args.label] = {
        "device": torch.cuda.get_device_name() if clock.cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "size": list(args.size), "classes": args.classes,
        "kept_queries": args.kept_queries, "train_size": args.train_size, "iters": args.iters,
        "wall_s": time.time() - t_start, "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(previous, indent=1, default=str))
    print_tables(results, args)
    print(f"JSON: {out} [{args.label}]")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
