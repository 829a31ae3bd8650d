#!/usr/bin/env python
"""CATSegSegmentor per-image time and peak memory vs. vocabulary size, class chunking and SED early rejection,
and its cost relative to OpenVocabMaskSegmentor on the same image and CLIP tower.

Random weights (speed does not depend on them). For each tower (`tiny` = ovseg's tiny random ViT, `ViT-B-16` =
the authors' B/16 size) and vocabulary size (150 = ADE-150, 847 = A-847), the same model is run as:
`plain` (the authors' computation), `chunked` (MODEL.CATSEG.CLASS_CHUNK, same result, bounded memory) and `sed`
(MODEL.CATSEG.SED_TOPK early rejection); `agree` is the fraction of pixels whose argmax class equals `plain`'s.
`vs mask` is the median per-iteration time ratio of CAT-Seg to OpenVocabMaskSegmentor (configs/Base-MaskSeg.yaml)
on the same image and tower, the two timed alternately so other processes' load hits both alike. GPU: CUDA events
time each call, memory is the allocator's peak; CPU: wall time, growth of the process's peak RSS (coarse).

    python benchmarks/bench_catseg.py                                     # GPU if present, fp32
    python benchmarks/bench_catseg.py --device cpu --towers tiny --iters 2 --mode whole
    python benchmarks/bench_catseg.py --opts MODEL.CATSEG.CLIP_RESOLUTION "[384, 384]"   # any config key
Prints a table and writes benchmarks/results/bench_catseg.json.

`--authors <CAT-Seg checkout or bare git dir>`: instead, the authors' own CATSeg (their code, configs/vitb_384.yaml,
eval.sh's sliding window) against our CATSegSegmentor (configs/catseg/catseg_vitb16_authors.yaml) on the same
random ViT-B/16 weights (theirs saved, converted on load: tools/catseg_parity.py builds both), the same image and
ADE-150's 150 classes, fp32. The two run alternately (text embeddings cached by both after a warm-up call); `peak
MiB` is the growth of the process's peak RSS in one call of each (CPU only: their code's .cuda() calls are no-ops).

    PYTHONPATH=/tmp/pkgs python benchmarks/bench_catseg.py --authors /path/to/CAT-Seg --device cpu --iters 2
Writes benchmarks/results/bench_catseg_authors.json.
"""
import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detectron2.modeling import build_model  # noqa: E402

from benchmarks.memory import PeakMemory  # noqa: E402
from ovseg.config import get_ovseg_cfg  # noqa: E402
from ovseg.modeling.tiny_models import TINY_VIT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOWERS = {"tiny": (TINY_VIT, "[1, 2]"), "ViT-B-16": ("ViT-B-16", "[3, 7]")}


def build(config: str, tower: str, classes: int, device: str, opts) -> torch.nn.Module:
    name, blocks = TOWERS[tower]
    vocab = ",".join(f"class {i}" for i in range(classes))
    cfg = get_ovseg_cfg()
    cfg.merge_from_file(str(ROOT / config))
    if "catseg" in config:
        extra = ["MODEL.CLIP.FEATURE_BLOCKS", blocks]
    else:  # the tiny tower exports two levels: each feeds two of the pixel decoder's inputs (as tests/tiny_mask.py)
        extra = ["MODEL.MASK_SEG.TRAIN_VOCABULARY", vocab] + (
            ["MODEL.MASK_SEG.PIXEL_DECODER.IN_FEATURES", '["res2", "res2", "res3", "res3"]'] if tower == "tiny" else [])
    cfg.merge_from_list(["MODEL.CLIP.MODEL_NAME", name, "MODEL.CLIP.PRETRAINED", "", "MODEL.DEVICE", device,
                         "DATASETS.TRAIN", "()", "DATASETS.TEST", "()", "MODEL.TEXT.VOCABULARY", vocab, *extra,
                         *(opts if "catseg" in config else [])])
    torch.manual_seed(0)
    return build_model(cfg).eval()


class Timer:
    """Seconds of one call: CUDA events on a GPU (no host read inside the timed region), wall time on CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn, *args):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000, out
        t = time.perf_counter()
        out = fn(*args)
        return time.perf_counter() - t, out


def recording(rule, kept):
    """`rule` (the head's early_rejection) that also appends each call's kept fraction per view to `kept`."""
    def wrapped(cost):
        keep = rule(cost)
        kept.append(keep.float().mean(1))
        return keep
    return wrapped


def run(model, image, amp):
    h, w = image.shape[-2:]
    with torch.no_grad(), amp:
        return model([{"image": image, "height": h, "width": w}])[0]["sem_seg"]


def load_parity_tool():
    """tools/catseg_parity.py as a module (it builds the authors' model and ours on the same weights)."""
    spec = importlib.util.spec_from_file_location("catseg_parity", ROOT / "tools" / "catseg_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def versus_authors(args) -> None:
    """Per-image time and peak memory of the authors' CATSeg and ours, same weights / image / 150 classes, fp32."""
    if args.device != "cpu":
        raise SystemExit("--authors runs on CPU only (their code is run with its .cuda() calls made no-ops)")
    parity = load_parity_tool()
    device = "cpu"
    h, w = (int(s) for s in args.image.split(","))
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8).float()
    root = parity.authors_checkout(args.authors)
    sys.path.insert(0, root)
    import cat_seg  # noqa: F401  (registers their meta-architecture)

    work = tempfile.mkdtemp(prefix="bench_catseg_authors_")
    train_json = os.path.join(work, "train_classes.json")  # embedded once at build time: kept short
    Path(train_json).write_text(json.dumps(["wall", "sky"]))
    clip_state = parity.random_openai_clip_state(0)
    timer = Timer(device)
    with parity.authors_on_cpu(clip_state):
        theirs = parity.build_authors_model(root, os.path.join(root, "datasets/ade150.json"), train_json, clip_state,
                                            seed=0)
        weights = os.path.join(work, "catseg_random.pth")
        torch.save({"model": theirs.state_dict()}, weights)
        ours = parity.build_our_model(weights, "")  # ADE-150 with the config's (their) class names
        models = {"authors": theirs, "ovseg": ours}
        for m in models.values():
            for _ in range(args.warmup):
                run(m, image, nullcontext())
        times = {k: [] for k in models}
        for _ in range(args.iters):  # alternately: other processes' load hits both alike
            for k, m in models.items():
                t, _ = timer(run, m, image, nullcontext())
                times[k].append(t)
        peaks, outs = {}, {}
        for k, m in models.items():
            with PeakMemory(False) as mem:
                outs[k] = run(m, image, nullcontext())
            peaks[k] = mem.mib
    agree = (outs["authors"].argmax(0) == outs["ovseg"].argmax(0)).float().mean().item()
    diff = (outs["authors"] - outs["ovseg"]).abs().max().item()
    rows = [{"model": k, "tower": "ViT-B-16", "classes": 150, "image": [h, w], "device": device, "dtype": "fp32",
             "time_s": statistics.median(times[k]), "times_s": times[k], "peak_mib": peaks[k]} for k in models]
    ratio = rows[1]["time_s"] / rows[0]["time_s"]
    print(f"\nCAT-Seg ViT-B/16, 150 classes, {h}x{w} input, sliding window, {device} fp32, median of {args.iters}")
    print("| model | s / image | peak MiB |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['time_s']:.2f} | {r['peak_mib']:.0f} |")
    print(f"ovseg / authors time: {ratio:.2f}x; outputs: max |diff| {diff:.1e}, argmax agreement {agree:.4f}")
    out = Path(args.out.replace("bench_catseg.json", "bench_catseg_authors.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "time_ratio_ovseg_over_authors": ratio, "max_abs_diff": diff,
                               "argmax_agreement": agree}, indent=1))
    print(f"wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--towers", default="tiny,ViT-B-16")
    ap.add_argument("--classes", default="150,847")
    ap.add_argument("--image", default="640,853", help="H,W of the input (the issue's protocol: 640x853)")
    ap.add_argument("--mode", default="slide", choices=["slide", "whole"], help="MODEL.CATSEG.INFERENCE_MODE")
    ap.add_argument("--chunk", type=int, default=64, help="CLASS_CHUNK of the `chunked` variant")
    ap.add_argument("--sed-topk", type=int, default=8, help="SED_TOPK of the `sed` variant")
    ap.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--no-mask", action="store_true", help="skip the OpenVocabMaskSegmentor comparison")
    ap.add_argument("--out", default="benchmarks/results/bench_catseg.json")
    ap.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="CAT-Seg config overrides, KEY VALUE pairs")
    ap.add_argument("--authors", default="", help="the authors' CAT-Seg (checkout or bare git dir): compare with it")
    args = ap.parse_args()
    if args.authors:
        return versus_authors(args)
    device = args.device
    h, w = (int(s) for s in args.image.split(","))
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8).float().to(device)
    amp = torch.autocast(device, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    timer = Timer(device)
    rows = []
    for tower in args.towers.split(","):
        for classes in (int(c) for c in args.classes.split(",")):
            cat = build("configs/catseg/Base-CATSeg.yaml", tower, classes, device,
                        ["MODEL.CATSEG.INFERENCE_MODE", args.mode, *args.opts])
            mask = None if args.no_mask else build("configs/Base-MaskSeg.yaml", tower, classes, device, [])
            variants = {"plain": (0, 0), "chunked": (args.chunk, 0), "sed": (0, args.sed_topk)}
            kept = []  # fraction of classes SED keeps, per view
            cat.head.early_rejection = recording(cat.head.early_rejection, kept)
            reference = None
            for variant, (chunk, topk) in variants.items():
                cat.head.class_chunk, cat.head.reject_topk = chunk, topk
                for _ in range(args.warmup):
                    run(cat, image, amp)
                    if mask is not None and variant == "plain":
                        run(mask, image, amp)
                times, ratios, out = [], [], None
                with PeakMemory(device == "cuda") as mem:
                    for _ in range(args.iters):
                        t, out = timer(run, cat, image, amp)
                        times.append(t)
                        if mask is not None and variant == "plain":
                            tm, _ = timer(run, mask, image, amp)
                            ratios.append(t / tm)
                labels = out.argmax(0)
                if reference is None:
                    reference = labels
                rows.append({"tower": tower, "classes": classes, "variant": variant, "chunk": chunk, "sed_topk": topk,
                             "image": [h, w], "mode": args.mode, "device": device, "bf16": args.bf16,
                             "time_s": statistics.median(times), "peak_mib": mem.mib,
                             "agree": (labels == reference).float().mean().item(),
                             "sed_kept": torch.cat(kept).mean().item() if topk and kept else None,
                             "vs_mask": statistics.median(ratios) if ratios else None})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nCATSegSegmentor, {h}x{w} input, {args.mode}, {device}{' bf16' if args.bf16 else ''}, "
          f"median of {args.iters}")
    print("| tower | classes | variant | ms / image | peak MiB | argmax agrees with plain | vs mask segmentor |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        vs = f"{r['vs_mask']:.2f}x" if r["vs_mask"] else "-"
        name = r["variant"] + (f" ({r['chunk']})" if r["chunk"] else "") + (f" (k={r['sed_topk']})" if r["sed_topk"]
                                                                            else "")
        kept = f", {100 * r['sed_kept']:.0f}% kept" if r["sed_kept"] is not None else ""
        print(f"| {r['tower']} | {r['classes']} | {name}{kept} | {1000 * r['time_s']:.0f} | {r['peak_mib']:.0f} "
              f"| {r['agree']:.3f} | {vs} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
