#!/usr/bin/env python
"""Train and evaluate ovseg models (detectron2 engine; multi-GPU / multi-machine through `launch`).

    python train_net.py --config-file configs/ade_clipself.yaml --num-gpus 4
    python train_net.py --config-file configs/clip_dense_vitb16.yaml --eval-only \
        DATASETS.TEST "('ade20k_150_sem_seg_val',)"
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
"""
import itertools
import logging
import os
from collections import OrderedDict

import detectron2.utils.comm as comm
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, SemSegEvaluator, verify_results
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils.logger import setup_logger

import ovseg  # noqa: F401  (registers ovseg's models and datasets)
from ovseg.config import get_ovseg_cfg
from ovseg.data.mappers import build_train_mapper


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def set_test_vocabulary(model, cfg, dataset_name: str) -> None:
    """Point an open-vocabulary model at the classes of the dataset it is about to be evaluated on."""
    model = _unwrap(model)
    if hasattr(model, "set_vocabulary"):
        model.set_vocabulary(cfg.MODEL.TEXT.VOCABULARY or dataset_name)


def model_outputs(cfg) -> set:
    """Which detectron2 outputs the configured model produces at test time."""
    if cfg.MODEL.META_ARCHITECTURE == "OpenVocabMaskSegmentor":
        t = cfg.MODEL.MASK_SEG.TEST
        return {k for k, on in (("sem_seg", t.SEMANTIC_ON), ("panoptic_seg", t.PANOPTIC_ON),
                                ("instances", t.INSTANCE_ON)) if on}
    return {"sem_seg"}


def _sem_seg_evaluator(name, out):
    return SemSegEvaluator(name, distributed=True, output_dir=out)


def _panoptic_evaluator(name, out):
    try:  # ovseg's backend choice (panopticapi, else hotcoco)
        from ovseg.evaluation.panoptic_quality import COCOPanopticEvaluator
    except ImportError:  # detectron2's own; needs panopticapi when it evaluates
        from detectron2.evaluation import COCOPanopticEvaluator
    return COCOPanopticEvaluator(name, out)


def _instance_evaluator(name, out):
    return COCOEvaluator(name, tasks=("segm",), distributed=True, output_dir=out)


_PANOPTIC_EVALUATORS = {"panoptic_seg": _panoptic_evaluator, "sem_seg": _sem_seg_evaluator,
                        "instances": _instance_evaluator}
# evaluator_type -> {model output -> evaluator builder}; a panoptic dataset scores all three outputs.
EVALUATORS = {
    "sem_seg": {"sem_seg": _sem_seg_evaluator},
    "coco_panoptic_seg": _PANOPTIC_EVALUATORS,
    "ade20k_panoptic_seg": _PANOPTIC_EVALUATORS,
    "coco": {"instances": _instance_evaluator},
}
# the ground truth each output's evaluator reads, as a metadata key; missing -> that evaluator is skipped
_NEEDS = {"sem_seg": "sem_seg_root", "instances": "json_file", "panoptic_seg": "panoptic_json"}


class Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        meta = MetadataCatalog.get(dataset_name)
        evaluator_type = meta.get("evaluator_type", None)
        table = EVALUATORS.get(evaluator_type, {})
        evaluators = []
        for output, build in table.items():
            if output not in model_outputs(cfg):
                continue
            # panoptic datasets carry semantic / instance ground truth only when prepared with it
            if evaluator_type != "sem_seg" and not meta.get(_NEEDS[output], None):
                continue
            evaluators.append(build(dataset_name, output_folder))
        if not evaluators:
            raise NotImplementedError(
                f"no evaluator for dataset {dataset_name!r} (evaluator_type={evaluator_type!r}) and model outputs "
                f"{sorted(model_outputs(cfg))}; known evaluator types: {sorted(EVALUATORS)}"
            )
        return DatasetEvaluators(evaluators)

    @classmethod
    def build_train_loader(cls, cfg):
        """Mapper by INPUT.DATASET_MAPPER_NAME (ovseg/data/mappers.py); "" = detectron2's DatasetMapper."""
        return build_detection_train_loader(cfg, mapper=build_train_mapper(cfg))

    @classmethod
    def build_optimizer(cls, cfg, model):
        """AdamW; trainable backbone parameters at BACKBONE_MULTIPLIER x the base LR (left out at 0); no weight
        decay on norms (WEIGHT_DECAY_NORM) and embeddings (WEIGHT_DECAY_EMBED)."""
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
                if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase)):
                    wd = cfg.SOLVER.WEIGHT_DECAY_NORM
                elif isinstance(module, torch.nn.Embedding) or (p.dim() < 2 and "bias" not in name) or \
                        name in ("void_embedding", "level_embed"):
                    wd = cfg.SOLVER.WEIGHT_DECAY_EMBED
                groups.append({"params": [p], "lr": lr, "weight_decay": wd})
        if not groups:
            raise ValueError(
                f"{cfg.MODEL.META_ARCHITECTURE} has no trainable parameters: evaluate it with --eval-only"
            )
        clip = cfg.SOLVER.CLIP_GRADIENTS
        if clip.ENABLED and clip.CLIP_TYPE == "full_model":
            # one gradient norm over the whole model (detectron2's own types clip each parameter on its own)
            return full_model_clipping(torch.optim.AdamW, clip.CLIP_VALUE)(groups, lr=cfg.SOLVER.BASE_LR)
        return maybe_add_gradient_clipping(cfg, torch.optim.AdamW(groups, lr=cfg.SOLVER.BASE_LR))

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
