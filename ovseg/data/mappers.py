"""Training dataset mappers for mask-classification models: dataset dict -> image + per-segment targets.

Both produce what `OpenVocabMaskSegmentor` trains on: "image" (3, H, W) uint8 RGB as a float-able tensor and
"instances" with `gt_classes` (N,) (indices into the dataset's vocabulary) and `gt_masks` (BitMasks (N, H, W)).
Chosen by INPUT.DATASET_MAPPER_NAME through `DATASET_MAPPERS` (below).
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Dict, List

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.projects.point_rend import ColorAugSSDTransform
from detectron2.structures import BitMasks, Instances

from .captions import ImageCaptionMapper
from .clipself_mapper import CLIPSelfDatasetMapper, RegionRecognitionDatasetMapper
from .image_io import check_label_size, image_to_tensor, read_image, rgb2id

logger = logging.getLogger(__name__)


def _instances(image_shape, classes: List[int], masks: List[np.ndarray]) -> Instances:
    inst = Instances(image_shape)
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    if masks:
        inst.gt_masks = BitMasks(torch.from_numpy(np.ascontiguousarray(np.stack(masks))))
    else:
        inst.gt_masks = BitMasks(torch.zeros((0, *image_shape), dtype=torch.bool))
    return inst


class MaskSemanticMapper:
    """Semantic-segmentation data: resize (short edge), crop (optionally class-balanced: no class may cover
    more than INPUT.CROP.SINGLE_CATEGORY_MAX_AREA of the crop), optionally SSD's colour augmentation
    (INPUT.COLOR_AUG_SSD), flip, optionally pad to a square (INPUT.PAD_SIZE); one target mask per class present."""

    # the raw pixel value of padding (Mask2Former's / CAT-Seg's semantic mapper)
    PAD_PIXEL = 128

    @configurable
    def __init__(self, *, augmentations: List[T.Augmentation], image_format: str = "RGB", ignore_label: int = 255,
                 pad_size: int = 0):
        if pad_size < 0:
            raise ValueError(f"INPUT.PAD_SIZE={pad_size}: give a side in pixels, or 0 for no padding")
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.ignore_label = ignore_label
        self.pad_size = pad_size
        logger.info("MaskSemanticMapper augmentations: %s", augmentations)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        augs: List[T.Augmentation] = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                                           cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
        ignore = _ignore_label(cfg)
        if cfg.INPUT.CROP.ENABLED:
            augs.append(T.RandomCrop_CategoryAreaConstraint(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE,
                                                            cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA, ignore))
        if cfg.INPUT.COLOR_AUG_SSD:
            # detectron2's (PointRend's) transform, which Mask2Former's and CAT-Seg's mappers add here, after the
            # crop: brightness, contrast, saturation, hue, each at random; it draws from Python's `random` (seeded
            # per sample by the training stream) and leaves labels alone
            augs.append(ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT))
        if cfg.INPUT.RANDOM_FLIP != "none":
            augs.append(T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                                     vertical=cfg.INPUT.RANDOM_FLIP == "vertical"))
        return {"augmentations": augs, "image_format": cfg.INPUT.FORMAT, "ignore_label": ignore,
                "pad_size": cfg.INPUT.PAD_SIZE}

    def _pad(self, image: np.ndarray, sem_seg: np.ndarray, file_name: str):
        """(H, W, C) image, (H, W) labels -> both padded bottom / right to pad_size x pad_size."""
        h, w = sem_seg.shape
        if h > self.pad_size or w > self.pad_size:
            # the authors' F.pad with a negative width would crop silently
            raise ValueError(f"{file_name!r}: the augmented image is {h}x{w}, larger than INPUT.PAD_SIZE="
                             f"{self.pad_size}; crop it to at most that size (INPUT.CROP) or raise PAD_SIZE")
        extra = ((0, self.pad_size - h), (0, self.pad_size - w))
        image = np.pad(image, extra + ((0, 0),), constant_values=self.PAD_PIXEL)
        return image, np.pad(sem_seg, extra, constant_values=self.ignore_label)

    def __call__(self, dataset_dict: Dict) -> Dict:
        d = copy.deepcopy(dataset_dict)
        if "sem_seg_file_name" not in d:
            raise ValueError(f"{d.get('file_name')!r}: the 'mask_semantic' mapper needs 'sem_seg_file_name'")
        image = read_image(d["file_name"], format=self.image_format)
        utils.check_image_size(d, image)
        label_path = d.pop("sem_seg_file_name")
        sem_seg = utils.read_image(label_path).astype("float64")
        if sem_seg.ndim == 3:
            sem_seg = sem_seg[..., 0]
        check_label_size(sem_seg, image, label_path, d["file_name"])
        aug = T.AugInput(image, sem_seg=sem_seg)
        self.augmentations(aug)
        image, sem_seg = aug.image, aug.sem_seg.round().astype(np.int64)
        if self.pad_size:
            # a crop smaller than the model's square input (an image more elongated than MAX_SIZE_TRAIN /
            # MIN_SIZE_TRAIN) is padded, not stretched by the model's resize
            image, sem_seg = self._pad(image, sem_seg, d["file_name"])
        d["image"] = image_to_tensor(image)
        d["sem_seg"] = torch.as_tensor(sem_seg)
        classes = [int(c) for c in np.unique(sem_seg) if c != self.ignore_label]
        d["instances"] = _instances(image.shape[:2], classes, [sem_seg == c for c in classes])
        return d


class MaskPanopticLSJMapper:
    """Panoptic data (COCO-panoptic PNG + segments_info) with large-scale jitter: flip, resize by a random
    factor of INPUT.IMAGE_SIZE within [MIN_SCALE, MAX_SCALE], then crop / pad to IMAGE_SIZE squared.
    One target per non-crowd segment, also when the crop left it empty (FC-CLIP's targets); padding is
    unlabelled."""

    @configurable
    def __init__(self, *, augmentations: List[T.Augmentation], image_format: str = "RGB"):
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        logger.info("MaskPanopticLSJMapper augmentations: %s", augmentations)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        size = cfg.INPUT.IMAGE_SIZE
        augs: List[T.Augmentation] = []
        if cfg.INPUT.RANDOM_FLIP != "none":
            augs.append(T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                                     vertical=cfg.INPUT.RANDOM_FLIP == "vertical"))
        augs += [
            T.ResizeScale(min_scale=cfg.INPUT.MIN_SCALE, max_scale=cfg.INPUT.MAX_SCALE, target_height=size,
                          target_width=size),
            T.FixedSizeCrop(crop_size=(size, size), seg_pad_value=0),  # id 0 = unlabelled in COCO panoptic
        ]
        return {"augmentations": augs, "image_format": cfg.INPUT.FORMAT}

    def __call__(self, dataset_dict: Dict) -> Dict:
        d = copy.deepcopy(dataset_dict)
        if "pan_seg_file_name" not in d or "segments_info" not in d:
            raise ValueError(f"{d.get('file_name')!r}: the 'mask_panoptic_lsj' mapper needs 'pan_seg_file_name' "
                             "and 'segments_info' (a COCO-panoptic dataset)")
        image = read_image(d["file_name"], format=self.image_format)
        utils.check_image_size(d, image)
        pan_path = d.pop("pan_seg_file_name")
        pan_rgb = utils.read_image(pan_path, "RGB")
        check_label_size(pan_rgb, image, pan_path, d["file_name"])
        # FC-CLIP resizes the RGB PNG itself (uint8: PIL NEAREST) and reads the ids afterwards; resizing an id map
        # as floats goes through torch's nearest, which samples half a pixel elsewhere
        aug = T.AugInput(image, sem_seg=pan_rgb)
        self.augmentations(aug)
        image, pan = aug.image, rgb2id(aug.sem_seg)
        d["image"] = image_to_tensor(image)
        classes, masks = [], []
        for seg in d.pop("segments_info"):
            if seg.get("iscrowd", 0):
                continue
            # a segment the crop cut away stays, as an empty-mask target (FC-CLIP / Mask2Former): it is matched
            # and counts in the mask-loss normaliser
            classes.append(int(seg["category_id"]))
            masks.append(pan == seg["id"])
        d["instances"] = _instances(image.shape[:2], classes, masks)
        d.pop("sem_seg_file_name", None)
        return d


class TestImageMapper:
    """The test mapper of INPUT.TEST_DATASET_MAPPER_NAME "": detectron2's test-time DatasetMapper (resize by
    INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST, "image" (3, h, w) uint8, labels left to the evaluators), except that the
    image is read with `image_io.read_image`: 16-bit greyscale scaled to 8 bits instead of clipped."""

    @configurable
    def __init__(self, *, augmentations: List[T.Augmentation], image_format: str = "RGB"):
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format

    @classmethod
    def from_config(cls, cfg, is_train: bool = False):
        return {"augmentations": utils.build_augmentation(cfg, is_train=False), "image_format": cfg.INPUT.FORMAT}

    def __call__(self, dataset_dict: Dict) -> Dict:
        d = copy.deepcopy(dataset_dict)
        image = read_image(d["file_name"], format=self.image_format)
        utils.check_image_size(d, image)
        aug = T.AugInput(image)
        self.augmentations(aug)
        d["image"] = image_to_tensor(aug.image)
        # evaluators read the ground truth from the files themselves
        for key in ("annotations", "sem_seg_file_name"):
            d.pop(key, None)
        return d


def default_mapper(cfg, is_train: bool):
    """Mapper name "": detectron2's DatasetMapper for training, `TestImageMapper` for testing."""
    return DatasetMapper(cfg, True) if is_train else TestImageMapper(cfg)


def _ignore_label(cfg) -> int:
    from detectron2.data import MetadataCatalog

    if cfg.DATASETS.TRAIN:
        return MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("ignore_label", 255)
    return 255


# INPUT.DATASET_MAPPER_NAME / INPUT.TEST_DATASET_MAPPER_NAME -> mapper class, built as cls(cfg, is_train)
DATASET_MAPPERS: Dict[str, Callable] = {
    "": default_mapper,  # detectron2's DatasetMapper to train; to test, one reading 16-bit images unclipped
    "clipself": CLIPSelfDatasetMapper,
    "region_recognition": RegionRecognitionDatasetMapper,
    "mask_semantic": MaskSemanticMapper,  # the mask segmentor's semantic / panoptic training mappers
    "mask_panoptic_lsj": MaskPanopticLSJMapper,
    "image_caption": ImageCaptionMapper,  # captioned images for image-text training (GroupViT)
}


def build_mapper(cfg, is_train: bool):
    """The mapper INPUT.DATASET_MAPPER_NAME (training) or INPUT.TEST_DATASET_MAPPER_NAME names."""
    name = cfg.INPUT.DATASET_MAPPER_NAME if is_train else cfg.INPUT.TEST_DATASET_MAPPER_NAME
    if name not in DATASET_MAPPERS:
        key = "INPUT.DATASET_MAPPER_NAME" if is_train else "INPUT.TEST_DATASET_MAPPER_NAME"
        raise ValueError(f"{key}={name!r}; known mappers: {sorted(DATASET_MAPPERS)}")
    return DATASET_MAPPERS[name](cfg, is_train)
