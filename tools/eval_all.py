#!/usr/bin/env python
r"""Evaluate one model/checkpoint on every benchmark and write one results table (markdown + JSON).

    python tools/eval_all.py [--columns A-150 VOC] --config-file configs/clip_dense_vitb16.yaml --output results/ \
        [MODEL.WEIGHTS ...]

Columns follow the FC-CLIP / CAT-Seg papers: A-847, PC-459, A-150, PC-59, VOC (mIoU), then ADE and COCO PQ.
The training-free papers' other benchmarks (PC-60, COCO-Obj, City) and CAT-Seg's PAS-20b are added to the table
when named in --columns.
Benchmarks whose data is missing are reported as "n/a" with the reason in the JSON, and the others still run.
Precision: MODEL.INFERENCE_DTYPE (fp32 | bf16 | fp16 | auto) among the overrides, as for train_net.py --eval-only.
"""
import argparse
import json
import os
import sys

# column -> (config in ovseg/configs/eval, evaluator task, metric); the config gives the column its DATASETS.TEST and
# the keys BENCHMARK_KEYS names for it, the rest is the model config's
COLUMNS = {
    "A-847": ("a847.yaml", "sem_seg", "mIoU"),
    "PC-459": ("pc459.yaml", "sem_seg", "mIoU"),
    "A-150": ("a150.yaml", "sem_seg", "mIoU"),
    "PC-59": ("pc59.yaml", "sem_seg", "mIoU"),
    "VOC": ("voc20.yaml", "sem_seg", "mIoU"),
    "ADE PQ": ("ade150_panoptic.yaml", "panoptic_seg", "PQ"),
    "COCO PQ": ("coco_panoptic.yaml", "panoptic_seg", "PQ"),
}
# on request only (SCLIP / ClearCLIP / NACLIP's tables): PC-60 and COCO-Object score a background class, which those
# methods assign below a probability threshold that belongs to the model config (configs/trainingfree/<method>/)
EXTRA_COLUMNS = {
    "PC-60": ("pc60.yaml", "sem_seg", "mIoU"),
    "COCO-Obj": ("coco_object.yaml", "sem_seg", "mIoU"),
    "City": ("cityscapes.yaml", "sem_seg", "mIoU"),
    # CAT-Seg's VOC with background: the background class named by 39 Pascal-Context classes (configs/eval/pas20b.yaml)
    "PAS-20b": ("pas20b.yaml", "sem_seg", "mIoU"),
}
# keys beyond DATASETS.TEST that define a column's benchmark, taken from its eval config (the user's opts still win)
BENCHMARK_KEYS = {
    "PAS-20b": ("MODEL.TEXT.VOCABULARY", "MODEL.CATSEG.SYNONYMS"),
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_value(cfg, key: str):
    """The value of a dotted key ("MODEL.TEXT.VOCABULARY") of a config."""
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def markdown_table(scores: dict, label: str, columns=tuple(COLUMNS)) -> str:
    cells = [f"{scores[c]:.1f}" if isinstance(scores.get(c), float) else "n/a" for c in columns]
    return "\n".join([
        "| model | " + " | ".join(columns) + " |",
        "| --- |" + " --- |" * len(columns),
        f"| {label} | " + " | ".join(cells) + " |",
    ]) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True,
                        help="model config, a yaml or a shipped name (the eval configs set the dataset, PAS-20b's also "
                             "its BENCHMARK_KEYS)")
    parser.add_argument("--output", default="results", help="folder for results.md / results.json")
    parser.add_argument("--columns", nargs="+", default=list(COLUMNS), choices=list(COLUMNS) + list(EXTRA_COLUMNS))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, e.g. MODEL.WEIGHTS model.pth")
    args = parser.parse_args(argv)

    sys.path.insert(0, ROOT)  # the ovseg package of this checkout, when it is not installed
    from detectron2.data import MetadataCatalog
    from detectron2.modeling import build_model

    from ovseg.data.custom import register_dataset_names
    from ovseg.engine import Trainer, UserError, load_config_file, load_eval_weights, merge_opts, resolve_device
    from ovseg.utils.paths import PACKAGE_DIR, resolve_config

    if "DATASETS.TEST" in args.opts[0::2]:
        raise UserError("eval_all sets DATASETS.TEST per column (--columns); for one dataset of yours run "
                        "train_net.py --eval-only with DATASETS.TEST")
    scores, details = {}, {}
    model, model_key = None, None
    for column in args.columns:
        eval_config, task, metric = {**COLUMNS, **EXTRA_COLUMNS}[column]
        eval_cfg = load_config_file(str(PACKAGE_DIR / "configs" / "eval" / eval_config), warn=False)
        cfg = load_config_file(str(resolve_config(args.config_file)), warn=False)
        cfg.DATASETS.TEST = tuple(eval_cfg.DATASETS.TEST)  # the eval config chooses the benchmark
        cfg.merge_from_list([x for key in BENCHMARK_KEYS.get(column, ()) for x in (key, config_value(eval_cfg, key))])
        # the user's overrides win over both configs; unknown keys and odd overrides are one line, as in
        # train_net.py; a CPU-only machine runs the shipped (cuda) configs on CPU, said once
        merge_opts(cfg, args.opts)
        cfg = resolve_device(cfg, warn=column == args.columns[0])
        cfg.OUTPUT_DIR = os.path.join(args.output, column.replace(" ", "_"))
        register_dataset_names(tuple(cfg.DATASETS.TRAIN))  # folder: / coco: names the model's vocabulary may read
        dataset = cfg.DATASETS.TEST[0]
        if model is None or model_key != cfg.MODEL.dump():
            # outside the per-benchmark handling: the model's or its weights' error would be every column's
            model, model_key = build_model(cfg).eval(), cfg.MODEL.dump()
            load_eval_weights(cfg, model)  # safe and strict, as train_net.py --eval-only
        try:
            result = Trainer.test(cfg, model)[dataset]
            details[column] = {"dataset": dataset, "results": result}
            scores[column] = float(result[task][metric])
        except UserError:
            raise
        except (FileNotFoundError, KeyError, ValueError) as e:
            details[column] = {"dataset": dataset, "error": f"{type(e).__name__}: {e}"}
            print(f"[eval_all] {column}: n/a ({e})", file=sys.stderr)
        details[column]["evaluator_type"] = MetadataCatalog.get(dataset).get("evaluator_type", None)

    os.makedirs(args.output, exist_ok=True)
    label = os.path.basename(args.config_file) + (f" {' '.join(args.opts)}" if args.opts else "")
    table = markdown_table(scores, label, list(COLUMNS) + [c for c in EXTRA_COLUMNS if c in args.columns])
    with open(os.path.join(args.output, "results.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump({"model": label, "scores": scores, "details": details}, f, indent=1, default=float)
    print(table)
    return scores


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from ovseg.engine import run_command

    # a user's mistake (config, weights) is one line, anything else a traceback
    run_command(main, user_errors=(ValueError,))
