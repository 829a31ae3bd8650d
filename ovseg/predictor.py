"""`ovseg.Predictor`: segment images for any vocabulary from Python, with a shipped config named in one word.

    from ovseg import Predictor
    p = Predictor("naclip_vitb16")
    out = p("photo.jpg", vocabulary=["cat", "sofa|couch"])
    out.sem_seg          # (H, W) int64 class indices
    out.visualize()      # (H, W, 3) uint8 RGB drawing with the class names
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.modeling import build_model
from detectron2.utils.visualizer import ColorMode, Visualizer
from PIL import Image

from .data.custom import PREFIXES, register_dataset_names
from .data.image_io import image_to_tensor, read_image
from .engine import load_config_file, load_eval_weights, merge_opts, resolve_device
from .model_zoo import is_zoo_name, unknown_weights_error, zoo_entry
from .modeling.meta_arch import OpenVocabModel
from .modeling.test_time_augmentation import SegmentorWithTTA
from .modeling.text import Vocabulary, parse_vocabulary
from .utils.paths import config_roots, resolve_config, shipped_configs  # noqa: F401 - public here too
from .utils.precision import inference_autocast, resolve_inference_dtype

logger = logging.getLogger(__name__)

__all__ = ["Prediction", "Predictor", "config_roots", "resolve_config", "shipped_configs"]

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]

INPUT_FORMATS = ("RGB", "BGR")  # channel orders the predictor takes arrays / tensors in and feeds the model


def _check_format(value: str, what: str) -> str:
    if value not in INPUT_FORMATS:
        raise ValueError(f"{what}={value!r}: the channel order must be one of {list(INPUT_FORMATS)}")
    return value


def _as_rgb_array(image: ImageInput, where: str, input_format: str = "RGB") -> np.ndarray:
    """Any accepted image -> (H, W, 3) uint8 RGB array; one clear error otherwise. Arrays and tensors are in
    `input_format` channel order (paths and PIL images are decoded to RGB)."""
    if isinstance(image, (str, os.PathLike)):
        try:
            return read_image(os.fspath(image), format="RGB")  # EXIF rotation; gray / RGBA / palette / 16 bit -> RGB
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            raise ValueError(f"{where}: cannot read image {os.fspath(image)!r}: {type(e).__name__}: {e}") from e
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"{where}: an image tensor must be (3, H, W) {input_format}, got shape "
                             f"{tuple(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
        if image.dtype != np.uint8:  # float 0-255, as detectron2's inputs
            image = np.clip(np.round(image.astype(np.float64)), 0, 255).astype(np.uint8)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"{where}: an image array must be (H, W, 3) uint8 {input_format}, got shape "
                             f"{image.shape} dtype {image.dtype}")
        if min(image.shape[:2]) < 1:
            raise ValueError(f"{where}: empty image of shape {image.shape}")
        return np.ascontiguousarray(image[:, :, ::-1] if input_format == "BGR" else image)
    raise TypeError(f"{where}: expected a path, PIL image, (H, W, 3) uint8 array or (3, H, W) tensor, got "
                    f"{type(image).__name__}")


def _class_colors(n: int) -> List[Tuple[int, int, int]]:
    # fixed seed: class i has the same colour in every call and process
    rng = np.random.RandomState(2024)
    return [tuple(int(c) for c in rng.randint(40, 256, size=3)) for _ in range(n)]


def vocabulary_metadata(vocabulary: Vocabulary) -> Metadata:
    """Visualizer metadata naming the vocabulary's classes (not registered in the global MetadataCatalog)."""
    colors = _class_colors(len(vocabulary))
    return Metadata(name="ovseg_vocabulary", stuff_classes=vocabulary.names, stuff_colors=colors,
                    thing_classes=vocabulary.names, thing_colors=colors)


@dataclass
class Prediction:
    """The result for one image, at the image's own size.

    Attributes:
        image: (H, W, 3) uint8 RGB input as read.
        vocabulary: the classes the indices refer to.
        outputs: the model's detectron2 output dict ("sem_seg" (C, H, W) scores, "panoptic_seg", "instances").
    """

    image: np.ndarray
    vocabulary: Vocabulary
    outputs: Dict = field(repr=False)

    def __repr__(self) -> str:
        # the dataclass default printed every pixel of the image (a notebook cell's or print()'s output)
        h, w = self.image.shape[:2]
        return (f"Prediction({w}x{h} image, vocabulary: {self.vocabulary.summary(max_names=5)}, "
                f"outputs: {', '.join(sorted(self.outputs)) or 'none'})")

    @property
    def sem_seg(self) -> Optional[torch.Tensor]:
        """(H, W) int64 class indices (argmax of the class scores, or the label map itself under MODEL.SEM_SEG_OUTPUT
        "labels"); None when the model makes no semantic output."""
        scores = self.outputs.get("sem_seg")
        if scores is None:
            return None
        return (scores if scores.dim() == 2 else scores.argmax(0)).to(torch.int64).cpu()

    @property
    def panoptic(self) -> Optional[Tuple[torch.Tensor, List[Dict]]]:
        """((H, W) int segment ids, segments_info) as detectron2 gives it, or None when the model makes none."""
        pan = self.outputs.get("panoptic_seg")
        return None if pan is None else (pan[0].cpu(), pan[1])

    @property
    def instances(self):
        """detectron2 `Instances` (pred_masks, pred_classes, scores) on the CPU, or None."""
        inst = self.outputs.get("instances")
        return None if inst is None else inst.to("cpu")

    def class_areas(self) -> Dict[str, float]:
        """Fraction of the image given to each class by `sem_seg`, largest first (classes with no pixel left out)."""
        labels = self.sem_seg
        if labels is None:
            return {}
        counts = torch.bincount(labels.flatten(), minlength=len(self.vocabulary)).numpy()
        order = np.argsort(-counts, kind="stable")
        return {self.vocabulary.names[i]: float(counts[i] / labels.numel()) for i in order if counts[i] > 0}

    def visualize(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB: detectron2's Visualizer drawing of the panoptic result if it has segments, else the
        semantic one, else the instances, labelled with the class names."""
        vis = Visualizer(self.image, vocabulary_metadata(self.vocabulary), instance_mode=ColorMode.IMAGE)
        if self.panoptic is not None and (self.panoptic[1] or self.sem_seg is None):
            out = vis.draw_panoptic_seg(*self.panoptic)
        elif self.sem_seg is not None:
            out = vis.draw_sem_seg(self.sem_seg)
        elif self.instances is not None:
            out = vis.draw_instance_predictions(self.instances)
        else:
            raise ValueError(f"nothing to draw: the model gave {sorted(self.outputs)}")
        return out.get_image()


class Predictor:
    """An ovseg model in inference mode behind a plain call: images in, `Prediction`s out.

    The config's test resize (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST) is applied, as in `train_net.py --eval-only`;
    the results come back at each image's own size. The vocabulary is kept between calls and re-set on the model
    only when it changes (the text classifier caches the embeddings of every class it has seen).
    """

    def __init__(self, config: Union[str, os.PathLike, CfgNode] = "naclip_vitb16", *, weights: Optional[str] = None,
                 device: Optional[str] = None, dtype: Optional[str] = None, opts: Sequence[str] = (),
                 vocabulary: Union[None, str, Sequence[str], Vocabulary] = None, batch_size: int = 8,
                 input_format: Optional[str] = None):
        """
        Args:
            config: a shipped config's name (`naclip_vitb16`, see `resolve_config`), a yaml path, or a config.
            weights: a checkpoint for the whole model (MODEL.WEIGHTS), or a name from ovseg's model zoo (CLIP
                weights go to MODEL.CLIP.PRETRAINED, whole models to MODEL.WEIGHTS; see `ovseg.model_zoo`);
                default: the config's.
            device: "cpu", "cuda", "cuda:1", ...; default: the config's MODEL.DEVICE (CPU when CUDA is missing).
            dtype: inference precision "fp32", "bf16", "fp16" or "auto" (bf16 on CUDA GPUs that support it, fp32
                on CPU); default: the config's MODEL.INFERENCE_DTYPE.
            opts: config overrides, KEY VALUE ... as on the command line.
            vocabulary: the initial classes (a "cat,sofa|couch" string, a list, a text file or a dataset name).
            batch_size: the most images of one size per model forward.
            input_format: the channel order of the arrays and tensors given to the call, "RGB" or "BGR" (OpenCV's
                `cv2.imread`, as detectron2's `DefaultPredictor` takes); default: the config's INPUT.FORMAT ("RGB"
                for ovseg's configs). Paths and PIL images are always decoded correctly.
        """
        if input_format is not None:  # before the model is built
            _check_format(input_format, "input_format")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        # the yaml the config came from (None for a CfgNode)
        self.config_path: Optional[Path] = None if isinstance(config, CfgNode) else resolve_config(config)
        if self.config_path is None:
            cfg = config.clone()
            cfg.defrost()
            merge_opts(cfg, opts)
        else:  # unknown keys and odd opts: the same clear errors as train_net.py
            cfg = load_config_file(str(self.config_path), opts, warn=False)
        if weights is not None and is_zoo_name(weights) and not os.path.isfile(weights):
            # a model-zoo name goes to the key its entry is for (a CLIP's weights or the whole model's)
            cfg.merge_from_list([zoo_entry(weights).key, weights])
        elif weights is not None:  # the whole model's checkpoint; CLIP's own weights are MODEL.CLIP.PRETRAINED
            if "://" not in weights and not os.path.isfile(weights):
                raise FileNotFoundError(f"{unknown_weights_error('weights', weights)} (a checkpoint of the whole "
                                        "model; for CLIP weights alone use opts=['MODEL.CLIP.PRETRAINED', path])")
            cfg.MODEL.WEIGHTS = weights
        if device is not None:
            cfg.MODEL.DEVICE = device
        if dtype is not None:
            cfg.MODEL.INFERENCE_DTYPE = dtype
        cfg = resolve_device(cfg)  # "cuda" on a machine without CUDA: CPU, as train_net.py
        cfg.freeze()
        self.cfg = cfg
        _check_format(cfg.INPUT.FORMAT, "INPUT.FORMAT")  # the model's order
        # the caller's order, as detectron2's DefaultPredictor converts its BGR arrays to INPUT.FORMAT
        self.input_format = _check_format(cfg.INPUT.FORMAT if input_format is None else input_format, "input_format")
        self.dtype = resolve_inference_dtype(cfg.MODEL.INFERENCE_DTYPE, cfg.MODEL.DEVICE)  # checked before building
        # a model trained on `folder:` / `coco:` data names them in DATASETS.*: its vocabulary comes from there
        register_dataset_names(tuple(cfg.DATASETS.TRAIN) + tuple(cfg.DATASETS.TEST))
        self.model = build_model(cfg).eval()
        if not isinstance(self.model, OpenVocabModel):
            raise TypeError(f"MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE!r} is not an ovseg open-vocabulary "
                            "model (OpenVocabModel): the predictor cannot set its vocabulary")
        if cfg.MODEL.WEIGHTS:  # safely and strictly, as train_net.py --eval-only
            load_eval_weights(cfg, self.model)
        elif self.model.parameters_needing_weights(bool(cfg.MODEL.CLIP.PRETRAINED)):
            logger.warning("%s has trained parts but no weights were given (weights=... / MODEL.WEIGHTS): its "
                           "predictions come from random parameters", cfg.MODEL.META_ARCHITECTURE)
        self.resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        # TEST.AUG.ENABLED: flip / multi-scale `sem_seg`, as train_net.py evaluates
        self._segment = SegmentorWithTTA(cfg, self.model).eval() if cfg.TEST.AUG.ENABLED else self.model
        self._vocabulary: Optional[Vocabulary] = None
        self._vocabulary_key: Optional[Tuple[Vocabulary, Optional[str]]] = None
        if vocabulary is not None:
            self.set_vocabulary(vocabulary)

    @property
    def vocabulary(self) -> Vocabulary:
        """The current classes: the last one given, else the config's (MODEL.TEXT.VOCABULARY / DATASETS.TEST)."""
        if self._vocabulary is None:
            try:
                self._vocabulary = self.model.vocabulary
            except ValueError as e:
                raise ValueError("no vocabulary: pass vocabulary=['cat', 'sofa|couch'] (or 'cat,sofa|couch') to "
                                 "the call or to Predictor(...)") from e
        return self._vocabulary

    def set_vocabulary(self, vocabulary: Union[str, Sequence[str], Vocabulary]) -> Vocabulary:
        """Switch the classes to segment; the model is told only when they differ from the current ones. A dataset
        name (a benchmark, `folder:<dir>`, `coco:<json>`) gives its classes, and its thing classes to a panoptic
        model."""
        if isinstance(vocabulary, str) and vocabulary.startswith(PREFIXES):
            register_dataset_names([vocabulary])
        vocab = parse_vocabulary(vocabulary)
        dataset = vocabulary if isinstance(vocabulary, str) and vocabulary in MetadataCatalog.list() else None
        # the same classes from a dataset and from a list differ in their thing flags: both are part of the key
        if (vocab, dataset) != self._vocabulary_key:
            self.model.set_vocabulary(dataset or vocab)
            self._vocabulary, self._vocabulary_key = vocab, (vocab, dataset)
        return vocab

    def _model_input(self, image: np.ndarray) -> Dict:
        resized = self.resize.get_transform(image).apply_image(image)
        if self.cfg.INPUT.FORMAT == "BGR":
            resized = resized[:, :, ::-1]
        chw = image_to_tensor(resized).float()
        return {"image": chw, "height": image.shape[0], "width": image.shape[1]}

    @torch.no_grad()
    def __call__(self, images: Union[ImageInput, Sequence[ImageInput]],
                 vocabulary: Union[None, str, Sequence[str], Vocabulary] = None
                 ) -> Union[Prediction, List[Prediction]]:
        """Segment one image (a path, PIL image, (H, W, 3) uint8 array or (3, H, W) tensor, both in the
        `input_format` channel order) or a list of them. Images whose resized sizes agree go through the model
        together (up to `batch_size` per forward), the others one size at a time.

        Returns:
            a `Prediction` for one image, a list of them (in input order) for a list.
        """
        if vocabulary is not None:
            self.set_vocabulary(vocabulary)
        vocab = self.vocabulary
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if not items:
            raise ValueError("no images given")
        arrays = [_as_rgb_array(im, f"image {i}", self.input_format) for i, im in enumerate(items)]
        inputs = [self._model_input(a) for a in arrays]
        by_size: Dict[Tuple[int, int], List[int]] = {}
        for i, inp in enumerate(inputs):
            by_size.setdefault(tuple(inp["image"].shape[-2:]), []).append(i)
        outputs: List[Optional[Dict]] = [None] * len(inputs)
        with inference_autocast(self.cfg.MODEL.INFERENCE_DTYPE, self.cfg.MODEL.DEVICE):
            for same_size in by_size.values():
                # same size: no padding, so the batch gives what each image gives alone
                for start in range(0, len(same_size), self.batch_size):
                    idx = same_size[start:start + self.batch_size]
                    for i, out in zip(idx, self._segment([inputs[i] for i in idx])):
                        outputs[i] = out
        results = [Prediction(a, vocab, o) for a, o in zip(arrays, outputs)]
        return results[0] if single else results
