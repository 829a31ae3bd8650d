#!/usr/bin/env python
"""Train and evaluate ovseg models (detectron2 engine; multi-GPU / multi-machine through `launch`).

    python train_net.py --config-file configs/ade_clipself.yaml --num-gpus 4
    python train_net.py --config-file configs/clip_dense_vitb16.yaml --eval-only \
        DATASETS.TEST "('ade20k_150_sem_seg_val',)"
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
"""
import logging
import os
from collections import OrderedDict

import detectron2.utils.comm as comm
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils.logger import setup_logger

import ovseg  # noqa: F401  (registers ovseg's models and datasets)
from ovseg.config import get_ovseg_cfg
from ovseg.evaluation import build_benchmark_evaluator


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def set_test_vocabulary(model, cfg, dataset_name: str) -> None:
    """Point an open-vocabulary model at the classes of the dataset it is about to be evaluated on."""
    model = _unwrap(model)
    if hasattr(model, "set_vocabulary"):
        model.set_vocabulary(cfg.MODEL.TEXT.VOCABULARY or dataset_name)


class Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """detectron2's evaluators for the dataset's `evaluator_type`, limited to what the model outputs."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        meta_arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
        tasks = meta_arch.output_tasks(cfg) if hasattr(meta_arch, "output_tasks") else None
        return build_benchmark_evaluator(dataset_name, output_dir=output_folder, tasks=tasks)

    @classmethod
    def build_optimizer(cls, cfg, model):
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                f"{cfg.MODEL.META_ARCHITECTURE} has no trainable parameters: evaluate it with --eval-only"
            )
        optimizer = torch.optim.AdamW(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
        return maybe_add_gradient_clipping(cfg, optimizer)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate on each test dataset in turn, switching the model's vocabulary to that dataset's classes."""
        results = OrderedDict()
        for idx, name in enumerate(cfg.DATASETS.TEST):
            DatasetCatalog.get(name)  # fail here, with the dataset's own message, if it is missing
            set_test_vocabulary(model, cfg, name)
            one = cfg.clone()
            one.defrost()
            one.DATASETS.TEST = (name,)
            results[name] = super().test(one, model, [evaluators[idx]] if evaluators else None)
        return results


def setup(args):
    cfg = get_ovseg_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE.startswith("cuda"):
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="ovseg")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        if not cfg.DATASETS.TEST:
            raise ValueError("--eval-only needs DATASETS.TEST, e.g. DATASETS.TEST \"('ade20k_150_sem_seg_val',)\"")
        model = Trainer.build_model(cfg)
        if cfg.MODEL.WEIGHTS:
            DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    logging.getLogger("ovseg").info("Command line arguments: %s", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
