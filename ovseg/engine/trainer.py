"""The training / evaluation engine behind `train_net.py`: detectron2's `DefaultTrainer` with ovseg's data
mappers, optimizer parameter groups and per-dataset vocabulary switch, and the `main` that `launch` runs in each
process (multi-GPU / multi-machine through detectron2's `launch`)."""
import itertools
import logging
import os
from collections import OrderedDict

import detectron2.utils.comm as comm
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils.logger import setup_logger

from ..config import get_ovseg_cfg
from ..data.clipself_mapper import CLIPSelfDatasetMapper, RegionRecognitionDatasetMapper, register_image_folders
from ..data.custom import register_dataset_names
from ..data.datasets import check_benchmark_files
from ..data.mappers import TRAIN_MAPPERS
from ..evaluation import build_benchmark_evaluator

__all__ = ["DATASET_MAPPERS", "Trainer", "build_mapper", "default_argument_parser", "full_model_clipping", "launch",
           "launched_main", "main", "run", "set_test_vocabulary", "setup"]

# INPUT.DATASET_MAPPER_NAME / INPUT.TEST_DATASET_MAPPER_NAME -> mapper class, built as cls(cfg, is_train)
DATASET_MAPPERS = {
    "": DatasetMapper,
    "clipself": CLIPSelfDatasetMapper,
    "region_recognition": RegionRecognitionDatasetMapper,
    **TRAIN_MAPPERS,  # the mask segmentor's semantic / panoptic training mappers
}


def build_mapper(cfg, is_train: bool):
    name = cfg.INPUT.DATASET_MAPPER_NAME if is_train else cfg.INPUT.TEST_DATASET_MAPPER_NAME
    if name not in DATASET_MAPPERS:
        key = "INPUT.DATASET_MAPPER_NAME" if is_train else "INPUT.TEST_DATASET_MAPPER_NAME"
        raise ValueError(f"{key}={name!r}; known mappers: {sorted(DATASET_MAPPERS)}")
    return DATASET_MAPPERS[name](cfg, is_train)


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
    def build_train_loader(cls, cfg):
        register_image_folders(cfg.DATASETS.TRAIN)  # plain folders listed in DATASETS.TRAIN
        return build_detection_train_loader(cfg, mapper=build_mapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=build_mapper(cfg, is_train=False))

    @classmethod
    def build_optimizer(cls, cfg, model):
        """AdamW over the trainable parameters: backbone ones at SOLVER.BACKBONE_MULTIPLIER x the base LR (left out
        at 0); vectors (norm gains, biases, layer scales) at SOLVER.WEIGHT_DECAY_NORM and embeddings (queries, void,
        level embeddings) at SOLVER.WEIGHT_DECAY_EMBED, as open_clip / CLIPSelf and Mask2Former do; matrices at
        SOLVER.WEIGHT_DECAY. CLIP_TYPE "full_model" clips one gradient norm over the whole model."""
        groups = []
        for module_name, module in model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                lr, wd = cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY
                full = f"{module_name}.{name}" if module_name else name
                if full.startswith(("backbone.", "module.backbone.")):
                    lr *= cfg.SOLVER.BACKBONE_MULTIPLIER
                    if lr == 0:
                        continue
                if isinstance(module, torch.nn.Embedding) or name in ("void_embedding", "level_embed"):
                    wd = cfg.SOLVER.WEIGHT_DECAY_EMBED
                elif p.ndim < 2:
                    wd = cfg.SOLVER.WEIGHT_DECAY_NORM
                groups.append({"params": [p], "lr": lr, "weight_decay": wd})
        if not groups:
            raise ValueError(
                f"{cfg.MODEL.META_ARCHITECTURE} has no trainable parameters: evaluate it with --eval-only"
            )
        kwargs = dict(lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.ADAMW_BETAS), eps=cfg.SOLVER.ADAMW_EPS)
        clip = cfg.SOLVER.CLIP_GRADIENTS
        if clip.ENABLED and clip.CLIP_TYPE == "full_model":
            # one gradient norm over the whole model (detectron2's own types clip each parameter on its own)
            return full_model_clipping(torch.optim.AdamW, clip.CLIP_VALUE)(groups, **kwargs)
        return maybe_add_gradient_clipping(cfg, torch.optim.AdamW(groups, **kwargs))

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate on each test dataset in turn, switching the model's vocabulary to that dataset's classes."""
        results = OrderedDict()
        for idx, name in enumerate(cfg.DATASETS.TEST):
            if name not in DatasetCatalog.list():  # checked without loading: the test loader loads it once
                raise KeyError(f"DATASETS.TEST names {name!r}, which is not registered; see datasets/README.md")
            set_test_vocabulary(model, cfg, name)
            one = cfg.clone()
            one.defrost()
            one.DATASETS.TEST = (name,)
            results[name] = super().test(one, model, [evaluators[idx]] if evaluators else None)
        return results


def full_model_clipping(optimizer_class, max_norm: float):
    """`optimizer_class` whose step first clips the gradient norm of all its parameters together."""

    class FullModelGradientClipping(optimizer_class):
        def step(self, closure=None):
            params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure)

    FullModelGradientClipping.__name__ = optimizer_class.__name__ + "FullModelGradientClipping"
    return FullModelGradientClipping


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
    register_dataset_names(tuple(cfg.DATASETS.TRAIN) + tuple(cfg.DATASETS.TEST))  # folder: / coco: / custom:
    # missing data is reported before the weights load or training starts (test sets are used at its end)
    for name in (() if args.eval_only else cfg.DATASETS.TRAIN) + tuple(cfg.DATASETS.TEST):
        check_benchmark_files(name)
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


def launched_main(args):
    """`main` in each process `launch` starts. The ranks wait for each other at the end and tear the process group
    down before exiting: a rank that exits with its GLOO group alive can abort (SIGABRT, "terminate called without
    an active exception") while another still works."""
    result = main(args)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        comm.synchronize()
        torch.distributed.destroy_process_group()
    return result


def run(argv=None):
    """The command line of `train_net.py`: detectron2's arguments, then `launch` over the processes."""
    args = default_argument_parser().parse_args(argv)
    logging.getLogger("ovseg").info("Command line arguments: %s", args)
    return launch(launched_main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                  dist_url=args.dist_url, args=(args,))
