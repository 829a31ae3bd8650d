#!/usr/bin/env python
r"""Export a model with its vocabulary baked in: <output>.pt2 (torch.export), <output>.onnx and <output>.json.

    python tools/export.py --config naclip_vitb16 --vocab "cat,dog,sky" --output export/naclip \
        [--weights model.pth] [--check] [--check-sizes 224x288,320x416] [KEY VALUE ...]

--config: a shipped config's name or a yaml path (as `ovseg.Predictor`); trailing KEY VALUE pairs override it
(slide inference cannot be exported for any image size: add MODEL.DENSE_SEG.INFERENCE_MODE whole).
--check: run the ONNX model (onnxruntime) and the reloaded program against PyTorch on random images and print the
largest difference. See README "Export" and `ovseg.export`.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="shipped config name (naclip_vitb16) or yaml path")
    ap.add_argument("--vocab", default=None, help='classes, e.g. "cat,sofa|couch", a file or a dataset name '
                                                  "(default: the config's)")
    ap.add_argument("--weights", default=None, help="checkpoint of the whole model (MODEL.WEIGHTS)")
    ap.add_argument("--output", required=True, help="path prefix of the written files")
    ap.add_argument("--no-onnx", action="store_true", help="write only the torch.export program")
    ap.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch's)")
    # a flag: sizes after it would swallow the trailing KEY VALUE overrides (argparse reads them as more sizes)
    ap.add_argument("--check", action="store_true",
                    help="compare with PyTorch on random images (sizes: --check-sizes, default 224x288,320x416)")
    ap.add_argument("--check-sizes", type=_sizes, metavar="HxW,...", default=None,
                    help="the sizes --check uses, e.g. 224x224,288x320 (implies --check)")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = ap.parse_args(argv)
    args.check = args.check or args.check_sizes is not None
    return args


def _sizes(text: str):
    """"224x224,288x320" -> [(224, 224), (288, 320)] (one argument: nothing after it is read as a size)."""
    try:
        sizes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(len(hw) != 2 or min(hw) < 1 for hw in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: give sizes as HxW,HxW,... (e.g. 224x224,288x320)")
    return sizes


def main(argv=None) -> dict:
    args = parse_args(argv)
    from ovseg.export import compare_with_eager, export_model
    from ovseg.predictor import Predictor

    predictor = Predictor(args.config, weights=args.weights, device="cpu", dtype="fp32", opts=args.opts,
                          vocabulary=args.vocab)
    files = export_model(predictor.model, args.output, opset=args.opset, onnx=not args.no_onnx, cfg=predictor.cfg)
    report = {"classes": len(files.info["classes"]), "min_size": files.info["min_size"]}
    for kind in ("program", "onnx"):
        path = getattr(files, kind)
        if path is not None:
            report[f"{kind}_bytes"] = os.path.getsize(path)
            print(f"[export] wrote {path} ({os.path.getsize(path) / 2 ** 20:.1f} MiB)")
    print(f"[export] wrote {files.metadata}")
    if args.check:
        sizes = args.check_sizes or [(224, 288), (320, 416)]
        report["max_abs_diff"] = compare_with_eager(predictor.model, files, sizes)
        report["check_sizes"] = sizes
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    from ovseg.engine import run_command

    # a user's mistake (config, weights, vocabulary, slide inference) is one line, anything else a traceback
    run_command(main, user_errors=(ValueError,))
