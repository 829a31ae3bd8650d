"""The training / evaluation engine behind `train_net.py`: detectron2's `DefaultTrainer` with ovseg's data
mappers, optimizer parameter groups and per-dataset vocabulary switch, and the `main` that `launch` runs in each
process (multi-GPU / multi-machine through detectron2's `launch`)."""
import difflib
import itertools
import logging
import os
import signal
import sys
import weakref
from collections import OrderedDict

import detectron2.utils.comm as comm
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, build_detection_test_loader, get_detection_dataset_dicts
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    HookBase,
    SimpleTrainer,
    TrainerBase,
    create_ddp_model,
    default_argument_parser,
    default_setup,
    hooks,
    launch,
)
from detectron2.evaluation import verify_results
from detectron2.layers.batch_norm import LayerNorm as ChannelLayerNorm
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.projects.deeplab import build_lr_scheduler as deeplab_build_lr_scheduler
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils.logger import setup_logger

from ..config import get_ovseg_cfg
from ..data.custom import dataset_folder_name, register_dataset_names
from ..data.datasets import check_benchmark_files
from ..data.mappers import DATASET_MAPPERS, build_mapper
from ..evaluation import build_benchmark_evaluator
from ..model_zoo import is_zoo_name, resolve_weights, unknown_weights_error, zoo_entry, zoo_path
from ..modeling.matcher import HungarianMatcher
from ..modeling.meta_arch.base import OpenVocabModel
from ..modeling.meta_arch.clipself import CLIPSelfDistiller
from ..modeling.test_time_augmentation import SegmentorWithTTA
from ..utils.download import WeightsUnavailableError
from ..utils.paths import resolve_config
from ..utils.precision import inference_autocast
from .checkpoint import SafeCheckpointer
from .data import ResumableTrainLoader, capture_rng_state, resolve_data_seed, restore_rng_state
from .errors import NonFiniteLossError, UserError

__all__ = ["DATASET_MAPPERS", "SaveOnSignal", "Trainer", "build_mapper", "check_inputs", "default_argument_parser",
           "full_model_clipping", "launch", "launched_main", "load_config", "load_config_file", "load_eval_weights",
           "merge_opts", "main",
           "resolve_device", "run", "set_test_vocabulary", "setup"]

def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def set_test_vocabulary(model, cfg, dataset_name: str) -> None:
    """Point an open-vocabulary model at the dataset it is about to be evaluated on: its classes, or
    MODEL.TEXT.VOCABULARY / DATASET_VOCABULARIES (the same classes under other names) with the dataset's thing flags."""
    model = _unwrap(model)
    if isinstance(model, OpenVocabModel):
        model.set_test_dataset(dataset_name, OpenVocabModel.test_vocabulary_spec(cfg, dataset_name))


def resolve_device(cfg: CfgNode, warn: bool = True) -> CfgNode:
    """The config as it can run here: MODEL.DEVICE "cuda" becomes "cpu" on a machine without CUDA, and AMP (CUDA
    float16 autocast + grad scaler in detectron2's AMPTrainer) is turned off on CPU, each with one warning. Returns
    `cfg` itself when nothing changes, else a changed copy (frozen if `cfg` was)."""
    log = logging.getLogger("ovseg").warning if warn else (lambda *a: None)
    to_cpu = cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available()
    device = "cpu" if to_cpu else cfg.MODEL.DEVICE
    amp_off = cfg.SOLVER.AMP.ENABLED and not device.startswith("cuda")
    if not (to_cpu or amp_off):
        return cfg
    frozen = cfg.is_frozen()
    cfg = cfg.clone()
    cfg.defrost()
    if to_cpu:
        log("MODEL.DEVICE is %s but CUDA is not available: running on CPU", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    if amp_off:
        log("SOLVER.AMP.ENABLED is ignored on %s (detectron2's AMP needs CUDA): training in float32", device)
        cfg.SOLVER.AMP.ENABLED = False
    if frozen:
        cfg.freeze()
    return cfg


class SaveOnSignal(HookBase):
    """On SIGINT / SIGTERM (a user's Ctrl-C, a cluster's pre-emption) finish the current iteration, save a checkpoint
    of it and exit with 128 + the signal number. A second signal interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, checkpointer):
        self.checkpointer = checkpointer
        self.received = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}")
        self.received = signum
        logging.getLogger("ovseg").warning("%s received: saving a checkpoint after this iteration",
                                           signal.Signals(signum).name)

    def before_train(self):
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread: signals cannot be handled here
            self._previous = {}

    def after_step(self):
        if self.received is None:
            return
        it = self.trainer.iter
        self.checkpointer.save(f"model_{it:07d}", iteration=it)
        comm.synchronize()
        raise SystemExit(128 + self.received)

    def after_train(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


class StudentTeacherEnsemble(HookBase):
    """CLIPSelf: after the last training step, mix the student with its teacher in weight space
    (`CLIPSelfDistiller.ensemble_with_teacher_`, MODEL.CLIPSELF.ENSEMBLE_ALPHA)."""

    def __init__(self, model: CLIPSelfDistiller):
        self.model = model

    def after_step(self):
        if self.trainer.iter == self.trainer.max_iter - 1:
            self.model.ensemble_with_teacher_()


WEIGHT_DECAY_RULES = ("ndim", "fcclip")
# SOLVER.OPTIMIZER -> (torch optimizer, its keyword arguments from the config besides the base LR)
OPTIMIZERS = {
    "ADAMW": (torch.optim.AdamW, lambda s: {"betas": tuple(s.ADAMW_BETAS), "eps": s.ADAMW_EPS}),
    # detectron2's build_optimizer reads these two for SGD
    "SGD": (torch.optim.SGD, lambda s: {"momentum": s.MOMENTUM, "nesterov": s.NESTEROV}),
}
# Norm layers as FC-CLIP's train_net.py lists them, plus detectron2's channels-first LayerNorm ("LN" norm)
NORM_MODULES = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
                torch.nn.GroupNorm, torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d,
                torch.nn.LayerNorm, torch.nn.LocalResponseNorm, ChannelLayerNorm)


def weight_decay_of(cfg, module: torch.nn.Module, name: str, param: torch.nn.Parameter) -> float:
    """Weight decay of `module`'s own parameter `name` under SOLVER.WEIGHT_DECAY_RULE. Embeddings are nn.Embedding
    modules and the parameters a module declares in its `embedding_parameters` (e.g. the classifier's void
    embedding); they get WEIGHT_DECAY_EMBED under both rules.
    "ndim" (open_clip / CLIPSelf): every other tensor with fewer than 2 dimensions (norm gains, biases, logit scale)
        at WEIGHT_DECAY_NORM;
    "fcclip" (FC-CLIP's train_net.py): parameters of norm layers at WEIGHT_DECAY_NORM; biases and the logit scale
        are decayed.
    Everything else at WEIGHT_DECAY."""
    s = cfg.SOLVER
    embedding = isinstance(module, torch.nn.Embedding) or name in getattr(module, "embedding_parameters", ())
    if s.WEIGHT_DECAY_RULE == "fcclip":
        if isinstance(module, NORM_MODULES):
            return s.WEIGHT_DECAY_NORM
        return s.WEIGHT_DECAY_EMBED if embedding else s.WEIGHT_DECAY
    if embedding:
        return s.WEIGHT_DECAY_EMBED
    if param.ndim < 2:
        return s.WEIGHT_DECAY_NORM
    return s.WEIGHT_DECAY


class Trainer(DefaultTrainer):
    """detectron2's `DefaultTrainer` made exact and safe: a resumable data stream and the RNG states in every
    checkpoint (a resumed run equals an uninterrupted one), atomic and safely loaded checkpoints
    (`SafeCheckpointer`), a checkpoint on SIGINT / SIGTERM, a clear stop on non-finite predictions or losses, and
    CPU runs (AMP off, DDP without device ids) as well as CUDA ones."""

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        """detectron2's, with the user's mistakes as one line: a config the model refuses (its ValueError names the
        key, e.g. MODEL.CLIP.FEATURE_BLOCKS beyond the tower's depth) or CLIP weights that cannot be downloaded."""
        try:
            return super().build_model(cfg)
        except WeightsUnavailableError as e:
            raise UserError(str(e)) from e
        except ValueError as e:
            raise UserError(f"{cfg.MODEL.META_ARCHITECTURE} cannot be built from this config: {e}") from e

    def __init__(self, cfg: CfgNode):
        # DefaultTrainer.__init__'s steps, with the CPU-aware DDP wrapper, our data stream and our checkpointer
        TrainerBase.__init__(self)
        cfg = DefaultTrainer.auto_scale_workers(resolve_device(cfg), comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        for m in model.modules():
            if isinstance(m, HungarianMatcher):
                m.register_forward_pre_hook(self._check_predictions_finite)
        # DDP on CPU (GLOO) takes no device ids; detectron2 passes the local rank as one by default
        ddp_kwargs = {} if cfg.MODEL.DEVICE.startswith("cuda") else {"device_ids": None}
        model = create_ddp_model(model, broadcast_buffers=False, **ddp_kwargs)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        checkpointables = {"data": data_loader} if isinstance(data_loader, ResumableTrainLoader) else {}
        self.checkpointer = SafeCheckpointer(model, cfg.OUTPUT_DIR, trust_pickle=cfg.MODEL.TRUST_PICKLED_WEIGHTS,
                                             trainer=weakref.proxy(self), **checkpointables)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        ret = super().build_hooks()
        if isinstance(_unwrap(self.model), CLIPSelfDistiller):
            # before the checkpointer (main process only) and the evaluation: model_final.pth and the final
            # evaluation hold the mix, on every rank alike
            at = next(i for i, h in enumerate(ret) if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook)))
            ret.insert(at, StudentTeacherEnsemble(_unwrap(self.model)))
        return ret + [SaveOnSignal(self.checkpointer)]

    def state_dict(self):
        ret = super().state_dict()
        ret["rng"] = capture_rng_state()  # the model's own randomness (point sampling, dropout) continues exactly
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "rng" in state_dict:
            restore_rng_state(state_dict["rng"])

    def _last_good_checkpoint(self) -> str:
        if comm.is_main_process() and self.checkpointer.has_checkpoint():
            return self.checkpointer.get_checkpoint_file()
        return "none saved yet"

    def _non_finite(self, what: str) -> NonFiniteLossError:
        return NonFiniteLossError(f"loss is NaN at iteration {self.iter} ({what}); last good checkpoint: "
                                  f"{self._last_good_checkpoint()}. Lower SOLVER.BASE_LR or enable "
                                  "SOLVER.CLIP_GRADIENTS, then resume from it")

    def _check_predictions_finite(self, module, args):
        """Forward pre-hook of the matcher: scipy's assignment fails on NaN costs with an unrelated message."""
        outputs = args[0]
        for key in ("pred_logits", "pred_masks"):
            v = outputs.get(key) if isinstance(outputs, dict) else None
            if isinstance(v, torch.Tensor) and not torch.isfinite(v).all():
                raise self._non_finite(f"the predictions {key} are not finite")

    def run_step(self):
        self._trainer.iter = self.iter
        try:
            self._trainer.run_step()
        except NonFiniteLossError:
            raise
        except FloatingPointError as e:  # detectron2's check of the loss values
            raise self._non_finite(str(e).strip()) from None

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """detectron2's evaluators for the dataset's `evaluator_type`, limited to what the model outputs, with the
        seen / unseen split of the model's training vocabulary (the rule its ensemble uses)."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_folder_name(dataset_name))
        meta_arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
        tasks, seen = None, None  # a detectron2 model: every task its dataset has, no split
        if issubclass(meta_arch, OpenVocabModel):
            tasks, seen = meta_arch.output_tasks(cfg), meta_arch.seen_for_dataset(cfg, dataset_name)
        return build_benchmark_evaluator(dataset_name, output_dir=output_folder, tasks=tasks, seen=seen)

    @classmethod
    def build_train_loader(cls, cfg):
        """The training stream (`ResumableTrainLoader`): detectron2's TrainingSampler order and batching, with each
        sample's augmentation seeded by (SEED, its position), so that a checkpoint can restore the rest exactly."""
        register_dataset_names(cfg.DATASETS.TRAIN)  # folder: / coco: / custom: names and plain image folders
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            raise UserError(f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN!r}: ovseg's resumable training "
                            "stream implements 'TrainingSampler' only")
        dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        return ResumableTrainLoader(
            dicts, build_mapper(cfg, is_train=True), seed=resolve_data_seed(cfg.SEED),
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH, rank=comm.get_rank(), world_size=comm.get_world_size(),
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING, num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=build_mapper(cfg, is_train=False))

    @classmethod
    def build_optimizer(cls, cfg, model):
        """SOLVER.OPTIMIZER ("ADAMW", "SGD": `OPTIMIZERS`) over the trainable parameters: backbone ones at
        SOLVER.BACKBONE_MULTIPLIER x the base LR (left out at 0); weight decay per SOLVER.WEIGHT_DECAY_RULE
        (`weight_decay_of`); a model's `optimizer_overrides()` ({parameter name: {"lr_multiplier", "weight_decay"}})
        takes precedence for the parameters it names. CLIP_TYPE "full_model" clips one gradient norm over the whole
        model."""
        if cfg.SOLVER.WEIGHT_DECAY_RULE not in WEIGHT_DECAY_RULES:
            raise ValueError(f"SOLVER.WEIGHT_DECAY_RULE={cfg.SOLVER.WEIGHT_DECAY_RULE!r}; "
                             f"use one of {list(WEIGHT_DECAY_RULES)}")
        if cfg.SOLVER.OPTIMIZER not in OPTIMIZERS:
            raise ValueError(f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r}; use one of {list(OPTIMIZERS)}")
        groups = []
        # a model may declare its own per-parameter LR multiplier / weight decay (CAT-Seg's fine-tuned CLIP)
        declared = getattr(_unwrap(model), "optimizer_overrides", None)
        overrides = declared() if callable(declared) else {}
        for module_name, module in model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                lr = cfg.SOLVER.BASE_LR
                full = f"{module_name}.{name}" if module_name else name
                own = overrides.get(full.removeprefix("module."))
                if own is not None or full.startswith(("backbone.", "module.backbone.")):
                    lr *= own.get("lr_multiplier", 1.0) if own is not None else cfg.SOLVER.BACKBONE_MULTIPLIER
                    if lr == 0:
                        continue
                decay = own["weight_decay"] if own and "weight_decay" in own else weight_decay_of(cfg, module, name, p)
                groups.append({"params": [p], "lr": lr, "weight_decay": decay})
        if not groups:
            raise ValueError(
                f"{cfg.MODEL.META_ARCHITECTURE} has no trainable parameters: evaluate it with --eval-only"
            )
        optimizer_class, options = OPTIMIZERS[cfg.SOLVER.OPTIMIZER]
        kwargs = dict(lr=cfg.SOLVER.BASE_LR, **options(cfg.SOLVER))
        clip = cfg.SOLVER.CLIP_GRADIENTS
        if clip.ENABLED and clip.CLIP_TYPE == "full_model":
            # one gradient norm over the whole model (detectron2's own types clip each parameter on its own)
            return full_model_clipping(optimizer_class, clip.CLIP_VALUE)(groups, **kwargs)
        return maybe_add_gradient_clipping(cfg, optimizer_class(groups, **kwargs))

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        """detectron2's schedulers, plus "WarmupPolyLR" (SOLVER.POLY_LR_POWER, POLY_LR_CONSTANT_ENDING): the DeepLab
        schedule detectron2 ships and Mask2Former / FC-CLIP train with (their train_net.py imports this builder)."""
        return deeplab_build_lr_scheduler(cfg, optimizer)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate on each test dataset in turn, switching the model's vocabulary to that dataset's classes, in the
        precision of MODEL.INFERENCE_DTYPE; with TEST.AUG.ENABLED, through `SegmentorWithTTA`."""
        results = OrderedDict()
        # TEST.AUG: flip / multi-scale `sem_seg`, as detectron2 wraps a model in GeneralizedRCNNWithTTA
        evaluated = SegmentorWithTTA(cfg, model) if cfg.TEST.AUG.ENABLED else model
        for idx, name in enumerate(cfg.DATASETS.TEST):
            if name not in DatasetCatalog.list():  # checked without loading: the test loader loads it once
                raise KeyError(f"DATASETS.TEST names {name!r}, which is not registered; see datasets/README.md")
            set_test_vocabulary(model, cfg, name)
            one = cfg.clone()
            one.defrost()
            one.DATASETS.TEST = (name,)
            with inference_autocast(cfg.MODEL.INFERENCE_DTYPE, cfg.MODEL.DEVICE):
                results[name] = super().test(one, evaluated, [evaluators[idx]] if evaluators else None)
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


def _config_keys(cfg: CfgNode, prefix: str = ""):
    for k, v in cfg.items():
        yield from _config_keys(v, f"{prefix}{k}.") if isinstance(v, CfgNode) else [f"{prefix}{k}"]


def _unknown_key(cfg: CfgNode, key: str, where: str) -> UserError:
    close = difflib.get_close_matches(key, list(_config_keys(cfg)), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return UserError(f"unknown config key {key} ({where}){hint}")


def load_config(args, warn: bool = True) -> CfgNode:
    """The config of the command line (`args.config_file`, then `args.opts`); see `load_config_file`."""
    return load_config_file(args.config_file, args.opts, warn)


def load_config_file(path: str, opts=(), warn: bool = True) -> CfgNode:
    """A config file with `opts` overrides, with one clear error for a user's mistake: an unknown key (with the
    closest known ones), an odd number of `opts`, a missing file. `warn`: log the device / AMP fallbacks
    (`resolve_device`)."""
    cfg = get_ovseg_cfg()
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        cfg.merge_from_file(path)
    except KeyError as e:  # detectron2: "Non-existent config key: X"
        raise _unknown_key(cfg, str(e.args[0]).rsplit(" ", 1)[-1], path) from None
    merge_opts(cfg, opts)
    return resolve_device(cfg, warn)


def merge_opts(cfg: CfgNode, opts) -> None:
    """`cfg.merge_from_list(opts)` with one clear error for an odd number of items or an unknown key."""
    opts = list(opts)
    if len(opts) % 2:
        raise UserError(f"config overrides come in KEY VALUE pairs; got an odd number ({len(opts)}): "
                        f"{' '.join(opts)}")
    known = set(_config_keys(cfg))
    for key in opts[0::2]:
        if key not in known:
            raise _unknown_key(cfg, key, "command line")
    cfg.merge_from_list(opts)


def check_inputs(cfg: CfgNode, eval_only: bool) -> None:
    """The user's inputs exist before any model is built: datasets (registered, files present) and MODEL.WEIGHTS."""
    # folder: / coco: / custom: names and plain image folders; the model may read DATASETS.TRAIN's vocabulary also
    # when it only evaluates
    register_dataset_names(tuple(cfg.DATASETS.TRAIN) + tuple(cfg.DATASETS.TEST))
    names = (() if eval_only else tuple(cfg.DATASETS.TRAIN)) + tuple(cfg.DATASETS.TEST)
    registered = DatasetCatalog.list()
    for name in names:
        if name not in registered:
            close = difflib.get_close_matches(name, registered, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise UserError(f"dataset {name!r} is not registered{hint} (see datasets/README.md)")
        check_benchmark_files(name)
    weights = cfg.MODEL.WEIGHTS
    if not eval_only and weights and is_zoo_name(weights) and not os.path.isfile(weights):
        # training starts from a file (detectron2's checkpointer reads paths)
        raise UserError(f"MODEL.WEIGHTS={weights!r} is a model-zoo name: names are read by --eval-only and "
                        f"ovseg.Predictor; to train from it, give its file ({zoo_path(zoo_entry(weights))})")
    try:  # model-zoo names are downloaded (or found in the cache) now: an offline machine fails here, in one line
        resolve_weights(cfg.MODEL.CLIP.PRETRAINED, "MODEL.CLIP.PRETRAINED", cfg.MODEL.CLIP.MODEL_NAME)
        weights = resolve_weights(weights, "MODEL.WEIGHTS")
    except (ValueError, WeightsUnavailableError) as e:
        raise UserError(str(e)) from e
    check_weights_file(weights, cfg.OUTPUT_DIR)


def check_weights_file(weights: str, output_dir: str = "") -> None:
    """MODEL.WEIGHTS (a resolved path; "" or a URL pass) is a file that is not empty, else one clear error. A file
    of the same name in `output_dir` (the config's OUTPUT_DIR, where its training wrote) is suggested."""
    if weights and "://" not in weights:
        if not os.path.isfile(weights):
            there = os.path.join(output_dir, os.path.basename(weights)) if output_dir else ""
            hint = f"; did you mean {there} (the config's OUTPUT_DIR)?" if there and os.path.isfile(there) else ""
            raise UserError(f"{unknown_weights_error('MODEL.WEIGHTS', weights)}{hint}")
        if os.path.getsize(weights) == 0:
            raise UserError(f"MODEL.WEIGHTS file {weights} is empty (0 bytes): an interrupted save or download?")


def load_eval_weights(cfg: CfgNode, model: torch.nn.Module, resume: bool = False) -> None:
    """Load MODEL.WEIGHTS (or, with `resume`, OUTPUT_DIR's last checkpoint) for evaluation: safely, and strictly
    (shapes must fit, trainable parameters must be in the file); no weights for a model with trainable parameters
    is an error too. MODEL.ALLOW_RANDOM_WEIGHTS True lifts both checks (random parameters on purpose)."""
    allow_random = cfg.MODEL.ALLOW_RANDOM_WEIGHTS
    checkpointer = SafeCheckpointer(model, save_dir=cfg.OUTPUT_DIR, trust_pickle=cfg.MODEL.TRUST_PICKLED_WEIGHTS,
                                    strict=not allow_random)
    if cfg.MODEL.WEIGHTS or (resume and checkpointer.has_checkpoint()):
        # a model-zoo name -> its verified file in the cache
        weights = resolve_weights(cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")
        if not (resume and checkpointer.has_checkpoint()):
            check_weights_file(weights, cfg.OUTPUT_DIR)  # fvcore asserts; eval_all skips check_inputs
        checkpointer.resume_or_load(weights, resume=resume)
        return
    # the CLIP towers' unlocked blocks start from MODEL.CLIP.PRETRAINED (CLIPSelf's "original" evaluation)
    core = _unwrap(model)
    untrained = (core.parameters_needing_weights(bool(cfg.MODEL.CLIP.PRETRAINED)) if isinstance(core, OpenVocabModel)
                 else [n for n, p in core.named_parameters() if p.requires_grad])
    if untrained and not allow_random:
        raise UserError(f"{cfg.MODEL.META_ARCHITECTURE} has {len(untrained)} trainable tensors that only MODEL.WEIGHTS "
                        f"can give (e.g. {untrained[0]}) but MODEL.WEIGHTS is empty: give the trained weights, or set "
                        "MODEL.ALLOW_RANDOM_WEIGHTS True to evaluate random ones on purpose")


def setup(args):
    cfg = load_config(args)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="ovseg")
    return cfg


def main(args):
    cfg = setup(args)
    # missing data / weights are reported before the model is built or training starts
    check_inputs(cfg, args.eval_only)
    if args.eval_only:
        if not cfg.DATASETS.TEST:
            raise UserError("--eval-only needs DATASETS.TEST, e.g. DATASETS.TEST \"('ade20k_150_sem_seg_val',)\"")
        model = Trainer.build_model(cfg)
        load_eval_weights(cfg, model, resume=args.resume)
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
    """The command line of `train_net.py`: detectron2's arguments, then `launch` over the processes. A user's
    mistake (config, data, weights, a non-finite loss) ends with one line on stderr and exit status 2."""
    args = default_argument_parser().parse_args(argv)
    logging.getLogger("ovseg").info("Command line arguments: %s", args)
    try:
        if args.config_file:  # a shipped config's name, as the demo, tools/eval_all.py and Predictor take
            try:
                args.config_file = str(resolve_config(args.config_file))
            except ValueError as e:  # an ambiguous name
                raise UserError(str(e)) from None
        # checked once here, before processes start, so that a mistake is one line and not one traceback per rank
        check_inputs(load_config(args, warn=False), args.eval_only)  # each process warns in its setup
        return launch(launched_main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                      dist_url=args.dist_url, args=(args,))
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except torch.multiprocessing.ProcessRaisedException as e:
        # a rank's mistake (weights that do not fit, a NaN loss) arrives as that rank's traceback text
        last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        kind, _, message = last.partition(": ")
        if kind.rsplit(".", 1)[-1] in ("UserError", "NonFiniteLossError", "FileNotFoundError"):
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
        raise
