#!/usr/bin/env python
"""Everything users run on a GPU, checked in one process in a few minutes: a pass/fail table, not a benchmark.

Random weights (open_clip models with MODEL.CLIP.PRETRAINED ""); each case is run on its own and reports its
error instead of stopping the run:
  - build every meta-architecture (CLIPDenseSegmentor, OpenVocabMaskSegmentor, CLIPSelfDistiller) with ViT-B-16
    and EVA02-B-16;
  - inference in fp32 and under bf16 autocast: semantic + panoptic + instance outputs of the mask segmentor,
    semantic of the dense segmentor, region scores of the distiller; every output tensor checked for device
    (the model's), dtype and shape;
  - a few AMP training iterations (bf16 autocast) of the mask segmentor and of CLIPSelf;
  - the demo on the bundled image (demo/examples/scene.jpg, --random-init);
  - with 2+ GPUs, a 2-process NCCL training of the mask segmentor (detectron2's `launch`).

    python benchmarks/gpu_check.py                          # cuda, ViT-B-16 and EVA02-B-16
    python benchmarks/gpu_check.py --device cpu --tiny      # tiny towers, small images: the CPU smoke test
On a GPU machine without ovseg's dependencies: `source .gpu-bundle/env.sh && python3 benchmarks/gpu_check.py`
(../shared/gpu/README.md). Prints a table last and writes benchmarks/results/gpu_check.json (--out).
Exit status 0 when every case passed, 1 otherwise.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Instances  # noqa: E402

from ovseg.config import get_ovseg_cfg  # noqa: E402
from ovseg.data.clipself_mapper import grid_boxes  # noqa: E402
from ovseg.modeling.tiny_models import TINY_EVA, TINY_VIT  # noqa: E402

ARCHS = {  # meta-architecture -> its config file
    "CLIPDenseSegmentor": "configs/clip_dense_vitb16.yaml",
    "OpenVocabMaskSegmentor": "configs/Base-MaskSeg.yaml",
    "CLIPSelfDistiller": "configs/clipself/Base-CLIPSelf.yaml",
}
TOWERS = {False: ("ViT-B-16", "EVA02-B-16"), True: (TINY_VIT, TINY_EVA)}
VOCAB = ["sky", "tree", "grass", "person", "car", "house"]
IS_THING = [False, False, False, True, True, True]
# the tiny towers export 2 levels and need a small head (as tests/tiny_mask.py)
TINY_MASK_OPTS = [
    "MODEL.MASK_SEG.PIXEL_DECODER.IN_FEATURES", "['res2', 'res2', 'res3', 'res3']",
    "MODEL.MASK_SEG.PIXEL_DECODER.CONV_DIM", "32", "MODEL.MASK_SEG.PIXEL_DECODER.MASK_DIM", "32",
    "MODEL.MASK_SEG.PIXEL_DECODER.TRANSFORMER_LAYERS", "1", "MODEL.MASK_SEG.PIXEL_DECODER.TRANSFORMER_HEADS", "4",
    "MODEL.MASK_SEG.PIXEL_DECODER.TRANSFORMER_FFN_DIM", "64", "MODEL.MASK_SEG.DECODER.HIDDEN_DIM", "32",
    "MODEL.MASK_SEG.DECODER.NUM_QUERIES", "8", "MODEL.MASK_SEG.DECODER.HEADS", "4",
    "MODEL.MASK_SEG.DECODER.FFN_DIM", "64", "MODEL.MASK_SEG.DECODER.LAYERS", "2",
    "MODEL.MASK_SEG.LOSS.NUM_POINTS", "256",
]


def make_cfg(arch: str, tower: str, args):
    cfg = get_ovseg_cfg()
    cfg.merge_from_file(str(ROOT / ARCHS[arch]))
    opts = ["MODEL.META_ARCHITECTURE", arch, "MODEL.CLIP.MODEL_NAME", tower, "MODEL.CLIP.PRETRAINED", "",
            "MODEL.DEVICE", args.device, "MODEL.TEXT.TEMPLATES", "single", "MODEL.TEXT.VOCABULARY", ",".join(VOCAB),
            "DATASETS.TRAIN", "()", "DATASETS.TEST", "()"]
    if arch == "OpenVocabMaskSegmentor":
        opts += ["MODEL.MASK_SEG.TRAIN_VOCABULARY", ",".join(VOCAB), "MODEL.MASK_SEG.TEST.SEMANTIC_ON", "True",
                 "MODEL.MASK_SEG.TEST.PANOPTIC_ON", "True", "MODEL.MASK_SEG.TEST.INSTANCE_ON", "True"]
        if args.tiny:
            opts += TINY_MASK_OPTS
    if arch == "CLIPSelfDistiller":  # the student's blocks train, as in configs/clipself/*_coco_patches.yaml
        opts += ["MODEL.CLIP.UNLOCK_LAST_BLOCKS", "3" if args.tiny else "12"]
    cfg.merge_from_list(opts)
    return cfg


def build(arch: str, tower: str, args):
    torch.manual_seed(0)
    model = build_model(make_cfg(arch, tower, args))
    if hasattr(model, "set_vocabulary") and arch == "OpenVocabMaskSegmentor":
        model.set_vocabulary(VOCAB, is_thing=IS_THING)
    return model.eval()


# ---------------------------------------------------------------------------------------------- output checks
def _check(cond: bool, what: str, problems: list) -> None:
    if not cond:
        problems.append(what)


def _same(a: torch.device, b: torch.device) -> bool:
    # "cuda" and "cuda:0" are the same device when 0 is the current one
    def norm(d):
        return torch.device(d.type, torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d
    return norm(a) == norm(b)


def check_outputs(outputs, inputs, device: torch.device, num_classes: int) -> list:
    """Problems (strings) with detectron2-format outputs: every tensor on `device`, the documented dtypes and
    shapes (sem_seg (C, H, W) float32; panoptic (H, W) integer + segments_info; instances of size (H, W))."""
    problems = []
    for out, inp in zip(outputs, inputs):
        hw = (inp["height"], inp["width"])
        if "sem_seg" in out:
            s = out["sem_seg"]
            _check(_same(s.device, device), f"sem_seg on {s.device}", problems)
            _check(s.dtype == torch.float32, f"sem_seg dtype {s.dtype}", problems)
            _check(tuple(s.shape) == (num_classes, *hw), f"sem_seg shape {tuple(s.shape)}", problems)
        if "panoptic_seg" in out:
            pan, info = out["panoptic_seg"]
            _check(_same(pan.device, device), f"panoptic_seg on {pan.device}", problems)
            _check(not pan.is_floating_point(), f"panoptic_seg dtype {pan.dtype}", problems)
            _check(tuple(pan.shape) == hw, f"panoptic_seg shape {tuple(pan.shape)}", problems)
            if info is not None:
                ids = set(torch.unique(pan).tolist()) - {0, -1}
                _check({s["id"] for s in info} >= ids, "panoptic segments_info misses ids in the map", problems)
        if "instances" in out:
            inst = out["instances"]
            _check(tuple(inst.image_size) == hw, f"instances image_size {inst.image_size}", problems)
            for name, value in inst.get_fields().items():
                t = value.tensor if hasattr(value, "tensor") else value
                _check(_same(t.device, device), f"instances.{name} on {t.device}", problems)
                _check(len(t) == len(inst), f"instances.{name} length {len(t)} != {len(inst)}", problems)
            if inst.has("pred_masks"):
                _check(tuple(inst.pred_masks.shape[1:]) == hw, f"pred_masks shape {tuple(inst.pred_masks.shape)}",
                       problems)
        for key in ("box_region_scores", "mask_region_scores"):
            if key in out:
                s = out[key]
                _check(_same(s.device, device), f"{key} on {s.device}", problems)
                _check(s.dtype == torch.float32, f"{key} dtype {s.dtype}", problems)
                _check(tuple(s.shape) == (inp["region_boxes"].shape[0], num_classes), f"{key} shape "
                       f"{tuple(s.shape)}", problems)
    return problems


# ---------------------------------------------------------------------------------------------------- inputs
def image_inputs(size: int, n: int = 1):
    h, w = size, size * 4 // 3
    return [{"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8), "height": h, "width": w}
            for _ in range(n)]


def region_inputs(size: int):
    inputs = image_inputs(size)
    for inp in inputs:
        h, w = inp["height"], inp["width"]
        boxes = grid_boxes(h, w, 2, 2)
        masks = torch.zeros(len(boxes), h, w)
        for k, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        inp.update(region_boxes=boxes, region_masks=masks)
    return inputs


def mask_training_batch(size: int, n: int = 2):
    batch = []
    for _ in range(n):
        inst = Instances((size, size))
        inst.gt_classes = torch.randint(0, len(VOCAB), (4,))
        masks = torch.zeros(4, size, size, dtype=torch.bool)
        for i in range(4):
            y, x = torch.randint(0, size // 2, (2,)).tolist()
            masks[i, y:y + size // 3, x:x + size // 3] = True
        inst.gt_masks = BitMasks(masks)
        batch.append({"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8), "instances": inst})
    return batch


def clipself_training_batch(size: int, crop: int, n: int = 2):
    return [{"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8),
             "region_boxes": grid_boxes(size, size, 2, 2),
             "crops": torch.randint(0, 256, (4, 3, crop, crop), dtype=torch.uint8)} for _ in range(n)]


# ----------------------------------------------------------------------------------------------------- cases
def autocast(device: str, dtype: str):
    return torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def case_inference(model, arch: str, dtype: str, args) -> str:
    inputs = region_inputs(args.size) if arch == "CLIPSelfDistiller" else image_inputs(args.size)
    with torch.no_grad(), autocast(args.device, dtype):
        outputs = model(inputs)
    problems = check_outputs(outputs, inputs, torch.device(model.device), len(VOCAB))
    if problems:
        raise AssertionError("; ".join(problems))
    keys = sorted(outputs[0])
    if "instances" in outputs[0]:
        keys.append(f"{len(outputs[0]['instances'])} inst")
    return ", ".join(keys)


def train_steps(model, batch, device: str, iters: int) -> str:
    """`iters` AdamW steps under bf16 autocast (AMP): losses finite, trained parameters changed."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise AssertionError("nothing to train")
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-4)
    losses = []
    for _ in range(iters):
        with autocast(device, "bf16"):
            loss_dict = model(batch)
        loss = sum(loss_dict.values())
        if not torch.isfinite(loss):
            raise AssertionError(f"loss {loss.item()} ({ {k: float(v) for k, v in loss_dict.items()} })")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    model.eval()
    if not any((p.detach() != b).any() for p, b in zip(params, before)):
        raise AssertionError("no trained parameter changed")
    return "losses " + " ".join(f"{v:.3g}" for v in losses)


def case_train(model, arch: str, args) -> str:
    if arch == "OpenVocabMaskSegmentor":
        batch = mask_training_batch(args.train_size)
    else:
        batch = clipself_training_batch(args.train_size, args.crop)
    return train_steps(model, batch, args.device, args.train_iters)


def case_demo(args) -> str:
    sys.path.insert(0, str(ROOT / "demo"))
    import demo as demo_cli  # demo/demo.py

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "scene.png")
        opts = ["MODEL.DEVICE", args.device]
        if args.tiny:
            opts += ["MODEL.CLIP.MODEL_NAME", TINY_VIT, "INPUT.MIN_SIZE_TEST", str(args.size),
                     "INPUT.MAX_SIZE_TEST", str(2 * args.size)]
        code = demo_cli.main(["--vocab", ",".join(VOCAB), "--input", str(ROOT / "demo/examples/scene.jpg"),
                              "--output", out, "--random-init", "--opts", *opts])
        if code != 0 or not os.path.getsize(out):
            raise AssertionError(f"demo exit {code}, output {'present' if os.path.exists(out) else 'missing'}")
        return f"wrote {os.path.getsize(out) // 1024} KiB"


def _ddp_worker(tower: str, args) -> None:
    from detectron2.utils import comm
    from torch.nn.parallel import DistributedDataParallel

    rank = comm.get_local_rank()
    if args.device.startswith("cuda"):
        torch.cuda.set_device(rank)
        args.device = f"cuda:{rank}"
    model = build("OpenVocabMaskSegmentor", tower, args)
    # on CPU (GLOO) DDP takes no device_ids
    model = DistributedDataParallel(model, device_ids=[rank] if args.device.startswith("cuda") else None,
                                    broadcast_buffers=False)
    torch.manual_seed(comm.get_rank())
    train_steps(model, mask_training_batch(args.train_size), args.device.split(":")[0], args.train_iters)
    # every rank ends with the same weights
    p = next(p for p in model.parameters() if p.requires_grad).detach().float().sum()
    ps = comm.all_gather(p.cpu())
    if not all(torch.equal(ps[0], q) for q in ps):
        raise AssertionError(f"ranks disagree after DDP steps: {ps}")


def case_ddp(tower: str, args) -> str:
    from detectron2.engine import launch

    # detectron2 picks NCCL with CUDA, GLOO without
    launch(_ddp_worker, num_gpus_per_machine=2, dist_url="auto", args=(tower, args))
    return "2 processes, weights equal on both ranks"


# ------------------------------------------------------------------------------------------------------ main
def run_case(results: list, name: str, fn, *fn_args) -> None:
    t0 = time.perf_counter()
    try:
        detail, ok = fn(*fn_args), True
    except Exception as e:  # noqa: BLE001 - every failure is reported, the run goes on
        tb = traceback.extract_tb(e.__traceback__)
        where = f" @ {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        detail, ok = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{where}"[:300], False
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    results.append({"case": name, "ok": ok, "seconds": round(time.perf_counter() - t0, 2), "detail": detail})
    print(f"[{'pass' if ok else 'FAIL'}] {name}: {detail}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny random towers and small images (CPU smoke test)")
    p.add_argument("--size", type=int, default=None, help="inference image short side (default 512; tiny 64)")
    p.add_argument("--train-size", type=int, default=None, help="square training image (default 512; tiny 64)")
    p.add_argument("--crop", type=int, default=None, help="CLIPSelf teacher crop (default 224; tiny 64)")
    p.add_argument("--train-iters", type=int, default=3)
    p.add_argument("--ddp", choices=["auto", "on", "off"], default="auto",
                   help="2-process training: auto = with 2+ GPUs; on = also on CPU (GLOO)")
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu_check.json"))
    args = p.parse_args(argv)
    args.size = args.size or (64 if args.tiny else 512)
    args.train_size = args.train_size or (64 if args.tiny else 512)
    args.crop = args.crop or (64 if args.tiny else 224)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("CUDA is not available: run with --device cpu (and --tiny for a quick check)")
    if args.tiny:
        from ovseg.modeling.tiny_models import register_tiny_models

        register_tiny_models()

    results: list = []
    t_start = time.perf_counter()
    for tower in TOWERS[args.tiny]:
        for arch in ARCHS:
            holder = {}

            def do_build(arch=arch, tower=tower, holder=holder):
                holder["model"] = build(arch, tower, args)
                n = sum(p.numel() for p in holder["model"].parameters()) / 1e6
                return f"{n:.1f} M parameters on {holder['model'].device}"

            run_case(results, f"{arch} {tower} build", do_build)
            if "model" not in holder:
                continue
            model = holder.pop("model")
            for dtype in ("fp32", "bf16"):
                run_case(results, f"{arch} {tower} infer {dtype}", case_inference, model, arch, dtype, args)
            if arch != "CLIPDenseSegmentor":
                run_case(results, f"{arch} {tower} train amp x{args.train_iters}", case_train, model, arch, args)
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if not args.skip_demo:
        run_case(results, "demo scene.jpg --random-init", case_demo, args)
    n_gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    if args.ddp == "on" or (args.ddp == "auto" and n_gpus >= 2):
        run_case(results, f"DDP 2 processes {TOWERS[args.tiny][0]} train", case_ddp, TOWERS[args.tiny][0], args)
    else:
        print(f"DDP case skipped: {n_gpus} GPU(s) (needs 2, or --ddp on)")

    env = {"python": platform.python_version(), "torch": torch.__version__, "device": args.device,
           "gpu": torch.cuda.get_device_name(0) if n_gpus else None, "gpus": n_gpus}
    for mod in ("timm", "open_clip", "numpy", "detectron2"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            env[mod] = f"unavailable ({type(e).__name__})"
    summary = {"env": env, "tiny": args.tiny, "total_seconds": round(time.perf_counter() - t_start, 1),
               "passed": sum(r["ok"] for r in results), "failed": sum(not r["ok"] for r in results),
               "cases": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))

    width = max(len(r["case"]) for r in results)
    print("\n" + " ".join(f"{k}={v}" for k, v in env.items()))
    print(f"{'case':<{width}}  result  seconds  detail")
    for r in results:
        print(f"{r['case']:<{width}}  {'pass' if r['ok'] else 'FAIL':<6}  {r['seconds']:>7.1f}  {r['detail']}")
    print(f"{summary['passed']} passed, {summary['failed']} failed in {summary['total_seconds']} s; "
          f"JSON: {args.out}")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
