#!/usr/bin/env python
"""Peak memory of semantic inference at many classes and large outputs (issue #12: 847 classes at 2000x1500
without a (C, H, W) float tensor at full resolution unless the caller asks for scores).

One process. At an output of H x W (default 1/4 of 2000x1500 per side, so that it runs on a small CPU machine)
and C classes, Q queries on a stride-4 mask grid, it measures the peak memory above the starting level
(benchmarks/memory.py: CPU peak RSS, GPU max allocated) of
  - scores: `semantic_inference` -> (C, H, W) float32, FC-CLIP's output format (what detectron2's evaluator reads);
  - labels: `semantic_labels` -> (H, W) int64, banded, never holding (C, H, W) or (Q, H, W);
  - CLIPDenseSegmentor.segment (tiny random tower, a 4x smaller input image, random text embeddings): the
    (C, H, W) probabilities vs `labels=True` (MODEL.SEM_SEG_OUTPUT "labels": a running argmax over class chunks);
and prints what the (C, H, W) tensor alone costs at the full 2000x1500.

    python benchmarks/bench_large_inputs.py                       # 847 classes at 500x375 on CPU
    python benchmarks/bench_large_inputs.py --size 1500,2000 --device cuda
Writes benchmarks/results/bench_large_inputs.json.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from detectron2.modeling import build_model  # noqa: E402
from memory import PeakMemory  # noqa: E402

from ovseg.modeling.postprocessing import OutputMasks, semantic_inference, semantic_labels  # noqa: E402


def dense_segmentor(device: str):
    """CLIPDenseSegmentor on the tiny random ViT (the encoder's cost is not what is measured)."""
    from ovseg.config import get_ovseg_cfg
    from ovseg.modeling.tiny_models import TINY_VIT, register_tiny_models

    register_tiny_models()
    cfg = get_ovseg_cfg()
    cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "CLIPDenseSegmentor", "MODEL.CLIP.MODEL_NAME", TINY_VIT,
                         "MODEL.CLIP.PRETRAINED", "", "MODEL.DEVICE", device, "MODEL.TEXT.VOCABULARY", "a,b"])
    torch.manual_seed(0)
    return build_model(cfg).eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="375,500", help="output height,width")
    ap.add_argument("--classes", type=int, default=847)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/bench_large_inputs.json"))
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split(","))
    cuda = args.device.startswith("cuda")
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(args.queries, args.classes + 1, generator=g).softmax(-1).to(args.device)
    grid = (-(-h // 16) * 4, -(-w // 16) * 4)  # stride-4 mask grid of the image padded to 16
    logits = torch.randn(args.queries, *grid, generator=g).to(args.device)
    masks = OutputMasks(logits, (grid[0] * 4, grid[1] * 4), (h, w), (h, w))
    rows = []
    with torch.no_grad():
        with PeakMemory(cuda) as m:
            labels_ref = semantic_inference(probs, masks).argmax(0)
        rows.append(("scores: semantic_inference (C, H, W)", m.mib))
        with PeakMemory(cuda) as m:
            labels = semantic_labels(probs, masks)
        rows.append(("labels: semantic_labels (H, W), banded", m.mib))
        dense = dense_segmentor(args.device)
        image = torch.randn(3, max(16, h // 4), max(16, w // 4), generator=g).to(args.device)
        text = torch.nn.functional.normalize(torch.randn(args.classes, dense.backbone.embed_dim, generator=g), dim=-1)
        dense_out = {}
        for as_labels in (False, True):
            with PeakMemory(cuda) as m:
                dense_out[as_labels] = dense.segment(image, text.to(args.device), (h, w), labels=as_labels)
            rows.append((f"CLIPDenseSegmentor.segment {'labels (H, W)' if as_labels else 'scores (C, H, W)'}", m.mib))
    dense_agree = (dense_out[True] == dense_out[False].argmax(0)).float().mean().item()
    agree = (labels == labels_ref).float().mean().item()
    full = args.classes * 2000 * 1500 * 4 / 2**20
    print(f"{args.classes} classes, {args.queries} queries, output {h}x{w}, device {args.device}")
    print(f"{'path':44} {'peak MiB':>9}")
    for name, mib in rows:
        print(f"{name:44} {mib:9.1f}")
    print(f"(C, H, W) float32 alone at this size: {args.classes * h * w * 4 / 2**20:.1f} MiB; at 2000x1500: "
          f"{full:.0f} MiB (a 'scores' sem_seg there; 'labels' never holds it)")
    print(f"label agreement with argmax of the scores: {agree:.6f} (mask post-processing), {dense_agree:.6f} (dense)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"size": [h, w], "classes": args.classes, "queries": args.queries,
                               "device": args.device, "peak_mib": dict(rows), "label_agreement": agree,
                               "dense_label_agreement": dense_agree,
                               "chw_float32_mib_at_2000x1500": full}, indent=1))
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
