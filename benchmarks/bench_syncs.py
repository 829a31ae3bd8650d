#!/usr/bin/env python
"""Host syncs, aten ops and dtype casts per image and per stage, from torch.profiler: the CPU proxy of how
host-bound each model's inference is on a GPU (issue #12).

One process, every model: CLIPDenseSegmentor with the NACLIP preset (configs/trainingfree/naclip_vitb16.yaml:
sliding windows, PAMR, background threshold) and OpenVocabMaskSegmentor with semantic + panoptic + instance
inference, each in fp32 and under bf16 autocast. One image per forward; the numbers are those of the last of
`--iters` forwards (after a warm-up, so that caches are filled), per image.

Counted per stage (the stage is the innermost wrapped method an op runs under; "other" = outside all of them):
  - syncs: ops that make the host wait for the device on a GPU: `.item()` / `int()` / `float()` / `bool()` of a
    tensor (aten::_local_scalar_dense), `.tolist()` (counted by a wrapper, it records no aten op), nonzero
    (also inside boolean indexing), unique, masked_select;
  - ops: aten ops called from Python (nested aten calls not counted again): a proxy of kernel launches;
  - casts: aten::_to_copy of tensors with at least one dimension (dtype casts: a kernel each on a GPU; there
    also device copies); scalar_casts: those of 0-dim tensors (Python numbers wrapped for an op, converted on the
    host, no kernel), counted apart;
  - host_only_reads: reads of CPU tensors that never touch the device (detectron2's ImageList computing the
    padded size from the image shapes), not counted as syncs.

    python benchmarks/bench_syncs.py                                  # tiny random models, CPU
    python benchmarks/bench_syncs.py --model ViT-B-16 --device cuda   # real sizes on a GPU
Prints a table and writes benchmarks/results/bench_syncs.json (`--label` names the run inside it, so that
before / after runs of the same script sit side by side).
"""
import argparse
import json
import os
import sys
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_mask_segmentor import make_confident  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import ovseg.modeling.meta_arch.mask_segmentor as mask_module  # noqa: E402
from ovseg.config import get_ovseg_cfg  # noqa: E402

STAGE = "stage::"
HOST_ONLY = "host_only::"  # reads of CPU tensors made from shapes: no device sync even on a GPU
TOLIST = "host_sync::tolist"
SYNC_OPS = {"aten::_local_scalar_dense": "item", "aten::nonzero": "nonzero", "aten::_unique2": "unique",
            "aten::unique_dim": "unique", "aten::unique_consecutive": "unique", "aten::_unique": "unique",
            "aten::masked_select": "masked_select", TOLIST: "tolist"}


def wrap(owner, attr: str, stage: str) -> None:
    """Run `owner.attr` inside a profiler range named after `stage` (instance attribute or module function)."""
    fn = getattr(owner, attr)

    def staged(*args, **kwargs):
        with record_function(STAGE + stage):
            return fn(*args, **kwargs)

    setattr(owner, attr, staged)


def mark_host_only() -> None:
    """detectron2's ImageList.from_tensors computes the padded size from CPU tensors of the image shapes."""
    from detectron2.structures import ImageList

    real = ImageList.from_tensors

    def from_tensors(*args, **kwargs):
        with record_function(HOST_ONLY + "ImageList.from_tensors"):
            return real(*args, **kwargs)

    ImageList.from_tensors = staticmethod(from_tensors)


def host_only(event) -> bool:
    e = event.cpu_parent
    while e is not None:
        if e.name.startswith(HOST_ONLY):
            return True
        e = e.cpu_parent
    return False


def count_tolist():
    real = torch.Tensor.tolist

    def tolist(self):
        with record_function(TOLIST):
            return real(self)

    torch.Tensor.tolist = tolist


def build(config: str, model_name: str, device: str, classes: int, opts):
    cfg = get_ovseg_cfg()
    cfg.merge_from_file(str(ROOT / config))
    vocab = ",".join(f"class {i}" for i in range(classes - 1)) + ",background"
    cfg.merge_from_list(["MODEL.CLIP.MODEL_NAME", model_name, "MODEL.CLIP.PRETRAINED", "", "MODEL.DEVICE", device,
                         "DATASETS.TRAIN", "()", "DATASETS.TEST", "()", "MODEL.TEXT.TEMPLATES", "single",
                         "MODEL.TEXT.VOCABULARY", vocab, *opts])
    torch.manual_seed(0)
    return build_model(cfg).eval()


def dense_model(args):
    model = build("configs/trainingfree/naclip_vitb16.yaml", args.model, args.device, args.classes, [])
    wrap(model.backbone, "forward", "encoder")
    wrap(model, "queries", "text")
    if model.pamr is not None:
        wrap(model.pamr, "affinities", "pamr")
        wrap(model.pamr, "propagate", "pamr")
    wrap(model, "segment", "windows+softmax+thresholds")
    return model


def tiny(args) -> bool:
    return args.model.startswith("ovseg-tiny")


def mask_model(args, vild: bool = False):
    vocab = ",".join(f"class {i}" for i in range(args.classes - 1)) + ",background"
    model = build("configs/Base-MaskSeg.yaml", args.model, args.device, args.classes,
                  ["MODEL.MASK_SEG.TRAIN_VOCABULARY", vocab, "MODEL.MASK_SEG.TEST.SEMANTIC_ON", "True",
                   "MODEL.MASK_SEG.TEST.PANOPTIC_ON", "True", "MODEL.MASK_SEG.TEST.INSTANCE_ON", "True",
                   "MODEL.MASK_SEG.VILD.ENABLED", str(vild),
                   *(["MODEL.MASK_SEG.PIXEL_DECODER.IN_FEATURES", "['res2', 'res2', 'res3', 'res3']"]
                     if tiny(args) else [])])  # the tiny tower exports 2 levels
    make_confident(model, args.kept_queries)  # random weights keep no query; a trained model keeps tens
    wrap(model, "preprocess", "preprocess")
    wrap(model, "encode", "encoder")
    wrap(model.pixel_decoder, "forward", "pixel decoder")
    wrap(model.transformer_decoder, "forward", "transformer decoder")
    wrap(model, "text_embeddings", "text")
    wrap(model, "class_probabilities", "classification")
    wrap(model, "postprocess", "post-processing")
    for fn, name in (("semantic_inference", "semantic"), ("panoptic_inference", "panoptic"),
                     ("instance_inference", "instance")):
        wrap(mask_module, fn, "post-processing/" + name)
    return model


def vild_model(args):
    """The mask segmentor with ViLD-image's head on: its ensemble with CLIP's region scores at inference."""
    return mask_model(args, vild=True)


# sizes that fit the tiny random tower (3 blocks); real towers take the shipped configs as they are
_TINY_CATSEG = ["MODEL.CLIP.FEATURE_BLOCKS", "[0, 1]", "MODEL.CATSEG.CLIP_RESOLUTION", "[64, 64]",
                "MODEL.CATSEG.WINDOW_SIZE", "2", "MODEL.CATSEG.HIDDEN_DIM", "32",
                "MODEL.CATSEG.TEXT_GUIDANCE_PROJ_DIM", "16", "MODEL.CATSEG.APPEARANCE_GUIDANCE_PROJ_DIM", "16",
                "MODEL.CATSEG.DECODER_DIMS", "[32, 16]", "MODEL.CATSEG.DECODER_GUIDANCE_DIMS", "[16, 8]",
                "MODEL.CATSEG.DECODER_GUIDANCE_PROJ_DIMS", "[8, 4]", "MODEL.CATSEG.PAD_LEN", "8",
                "MODEL.CATSEG.SLIDE_RESIZE", "[96, 96]", "MODEL.CATSEG.SLIDE_WINDOW", "64",
                "MODEL.CATSEG.SLIDE_STRIDE", "32"]
_TINY_LSEG = ["MODEL.CLIP.FEATURE_BLOCKS", "[0, 1, 2]", "MODEL.CLIP.UNLOCK_LAST_BLOCKS", "3",
              "MODEL.LSEG.IN_FEATURES", "['res2', 'res3', 'res4', 'res4']", "MODEL.LSEG.FEATURES", "32",
              "MODEL.LSEG.REASSEMBLE_CHANNELS", "[16, 32, 64, 64]"]
_TINY_GROUPVIT = ["MODEL.GROUPVIT.PATCH_SIZE", "16", "MODEL.GROUPVIT.EMBED_DIM", "32", "MODEL.GROUPVIT.DEPTHS",
                  "[1, 1, 1]", "MODEL.GROUPVIT.NUM_HEADS", "2", "MODEL.GROUPVIT.NUM_GROUP_TOKENS", "[8, 4, 0]",
                  "MODEL.GROUPVIT.NUM_OUTPUT_GROUPS", "[8, 4]", "MODEL.GROUPVIT.TEXT_CONTEXT_LENGTH", "16",
                  "MODEL.GROUPVIT.TEXT_WIDTH", "16", "MODEL.GROUPVIT.TEXT_LAYERS", "1",
                  "MODEL.GROUPVIT.TEXT_HEADS", "1",
                  "MODEL.GROUPVIT.PROJ_HIDDEN_DIM", "64", "MODEL.GROUPVIT.PROJ_DIM", "16"]


def catseg_model(args):
    """CAT-Seg with its shipped protocol: sliding windows plus a global view, per-class sigmoid."""
    model = build("configs/catseg/catseg_vitb16_coco_stuff.yaml", args.model, args.device, args.classes,
                  _TINY_CATSEG if tiny(args) else [])
    wrap(model, "encode", "encoder")
    wrap(model, "class_embeddings", "text")
    wrap(model.head, "forward", "cost aggregation")
    wrap(model, "segment", "windows+sigmoid+resize")
    return model


def lseg_model(args):
    model = build("configs/lseg/lseg_vitb16_ade20k.yaml", args.model, args.device, args.classes,
                  _TINY_LSEG if tiny(args) else [])
    wrap(model, "pixel_embeddings", "encoder+DPT decoder")
    wrap(model, "text_queries", "text")
    wrap(model, "segment", "logits+regularisation")
    return model


def groupvit_model(args):
    """GroupViT (its own tower: --model does not apply; the tiny run shrinks it)."""
    model = build("configs/groupvit/groupvit_s_captions.yaml", args.model, args.device, args.classes,
                  _TINY_GROUPVIT if tiny(args) else [])
    wrap(model, "encode_image", "encoder")
    wrap(model, "class_embeddings", "text")
    wrap(model, "segment", "groups->pixels")
    return model


MODELS = {"CLIPDenseSegmentor naclip": dense_model, "OpenVocabMaskSegmentor sem+pan+ins": mask_model,
          "OpenVocabMaskSegmentor ViLD sem+pan+ins": vild_model, "CATSegSegmentor slide": catseg_model,
          "LSegSegmentor": lseg_model, "GroupViTSegmentor": groupvit_model}


def stage_of(event) -> str:
    e = event.cpu_parent
    while e is not None:
        if e.name.startswith(STAGE):
            return e.name[len(STAGE):]
        e = e.cpu_parent
    return "other"


def counts(prof) -> dict:
    """{stage: {"ops", "casts", "syncs", "sync_kinds": {kind: n}}} from one profiled forward."""
    table = defaultdict(lambda: {"ops": 0, "casts": 0, "scalar_casts": 0, "syncs": 0, "host_only_reads": 0,
                                 "sync_kinds": defaultdict(int)})
    for e in prof.events():
        name = e.name
        if name.startswith(STAGE) or name.startswith(HOST_ONLY):
            continue
        row = table[stage_of(e)]
        if name in SYNC_OPS and host_only(e):
            row["host_only_reads"] += 1
        elif name in SYNC_OPS:
            row["syncs"] += 1
            row["sync_kinds"][SYNC_OPS[name]] += 1
        if not name.startswith("aten::"):
            continue
        parent = e.cpu_parent
        top = parent is None or not parent.name.startswith("aten::")
        row["ops"] += top
        # .to(dtype) and autocast record aten::to -> aten::_to_copy
        if name == "aten::_to_copy" and (top or parent.name == "aten::to"):
            scalar = bool(e.input_shapes) and e.input_shapes[0] == []
            row["scalar_casts" if scalar else "casts"] += 1
    return {k: {**v, "sync_kinds": dict(v["sync_kinds"])} for k, v in sorted(table.items())}


def run(model, image: torch.Tensor, dtype: str, iters: int) -> dict:
    amp = torch.autocast(image.device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    inputs = [{"image": image, "height": image.shape[-2], "width": image.shape[-1]}]
    with torch.no_grad(), amp:
        for _ in range(iters - 1):
            model(inputs)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            model(inputs)
    return counts(prof)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ovseg-tiny-ViT-16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="336,448", help="image height,width (4:3)")
    ap.add_argument("--classes", type=int, default=150)
    ap.add_argument("--kept-queries", type=int, default=50)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated names from MODELS")
    ap.add_argument("--label", default="current")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/bench_syncs.json"))
    args = ap.parse_args()
    if args.model.startswith("ovseg-tiny"):
        from ovseg.modeling.tiny_models import register_tiny_models

        register_tiny_models()
    count_tolist()
    mark_host_only()
    h, w = (int(v) for v in args.size.split(","))
    image = torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    image = image.to(args.device)
    results = {}
    for name in args.models.split(","):
        model = MODELS[name](args)
        for dtype in args.dtypes.split(","):
            results[f"{name} {dtype}"] = run(model, image, dtype, args.iters)

    print(f"{args.label}: {args.model} {h}x{w}, {args.classes} classes, device {args.device}; per image")
    print(f"{'model':44} {'stage':34} {'syncs':>5} {'ops':>6} {'casts':>5} {'0-dim':>5} {'host':>4}  sync kinds")
    for case, table in results.items():
        total = {k: sum(r[k] for r in table.values()) for k in ("syncs", "ops", "casts", "scalar_casts",
                                                                 "host_only_reads")}
        for stage, r in table.items():
            kinds = " ".join(f"{k}={n}" for k, n in sorted(r["sync_kinds"].items()))
            print(f"{case:44} {stage:34} {r['syncs']:5d} {r['ops']:6d} {r['casts']:5d} {r['scalar_casts']:5d} "
                  f"{r['host_only_reads']:4d}"
                  f"  {kinds}")
        print(f"{case:44} {'TOTAL':34} {total['syncs']:5d} {total['ops']:6d} {total['casts']:5d} "
              f"{total['scalar_casts']:5d} {total['host_only_reads']:4d}")
        table["TOTAL"] = total
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    previous[args.label] = {"model": args.model, "size": [h, w], "classes": args.classes,
                            "kept_queries": args.kept_queries, "device": args.device,
                            "torch": torch.__version__, "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(previous, indent=1))
    print(f"JSON: {os.path.relpath(out)} [{args.label}]")


if __name__ == "__main__":
    main()
