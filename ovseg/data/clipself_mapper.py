"""Dataset mappers of CLIPSelf: distillation regions + teacher crops for training, ground-truth panoptic regions
for the region-recognition evaluation; and plain image folders as detectron2 datasets.

Boxes are xyxy in pixels throughout. Crops for the teacher come from the full-resolution image, the student's
input is the image resized so that its longest side is one of the configured sizes.
"""
from __future__ import annotations

import json
import logging
import os
import random
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from PIL import Image

from .image_io import IMAGE_SUFFIXES, image_to_tensor, read_image, rgb2id

logger = logging.getLogger(__name__)

REGION_SOURCES = ("patches", "proposals")


# ---------------------------------------------------------------------------------------------- regions
def grid_choices(max_split: int, max_aspect: float) -> List[Tuple[int, int]]:
    """All (rows, cols) grids with 1 <= rows, cols <= max_split and max/min <= max_aspect."""
    if max_split < 1:
        raise ValueError(f"INPUT.CLIPSELF.GRID_MAX_SPLIT must be >= 1, got {max_split}")
    if max_aspect < 1:
        raise ValueError(f"INPUT.CLIPSELF.GRID_MAX_ASPECT must be >= 1, got {max_aspect}")
    return [(m, n) for m in range(1, max_split + 1) for n in range(1, max_split + 1)
            if max(m, n) / min(m, n) <= max_aspect]


def grid_boxes(height: float, width: float, rows: int, cols: int) -> torch.Tensor:
    """The rows x cols cells tiling an image exactly, row-major: (rows * cols, 4) xyxy."""
    ys = torch.linspace(0, height, rows + 1, dtype=torch.float64)
    xs = torch.linspace(0, width, cols + 1, dtype=torch.float64)
    # the last edge is the image border itself, not a rounded sum of steps
    ys[-1], xs[-1] = height, width
    y0, x0 = torch.meshgrid(ys[:-1], xs[:-1], indexing="ij")
    y1, x1 = torch.meshgrid(ys[1:], xs[1:], indexing="ij")
    return torch.stack([x0, y0, x1, y1], dim=-1).reshape(-1, 4).float()


def scale_boxes(boxes: torch.Tensor, factor: float, height: float, width: float) -> torch.Tensor:
    """Enlarge boxes by `factor` about their centres, clipped to the image."""
    if factor == 1.0:
        return boxes
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * factor / 2
    out = torch.cat([c - half, c + half], dim=1)
    out[:, 0::2] = out[:, 0::2].clamp(0, width)
    out[:, 1::2] = out[:, 1::2].clamp(0, height)
    return out


def crop_regions(image: np.ndarray, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """The teacher's view of each region, as CLIPSelf makes it: the image cut at the box rounded to whole pixels,
    its longest side resized to `size` (bicubic, aspect kept), centred on a black size x size square
    (open_clip's `ResizeMaxSize`).

    Args:
        image: (H, W, 3) uint8 RGB.
        boxes: (K, 4) xyxy boxes in pixels of `image`.
    Returns:
        (K, 3, size, size) uint8 crops.
    """
    pil = Image.fromarray(np.ascontiguousarray(image))
    crops = np.zeros((len(boxes), size, size, 3), dtype=np.uint8)
    for k, box in enumerate(boxes.tolist()):
        x0, y0, x1, y1 = (int(round(v)) for v in box)  # PIL's own rounding of a fractional crop box
        crop = pil.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))  # at least one pixel
        w, h = crop.size
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        top, left = (size - nh) // 2, (size - nw) // 2
        crops[k, top:top + nh, left:left + nw] = np.asarray(crop.resize((nw, nh), Image.BICUBIC))
    return torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()


def letterbox(image: np.ndarray, size: int) -> Tuple[np.ndarray, float]:
    """The student's input, as CLIPSelf makes it: longest side resized to `size` (bicubic, aspect kept), padded at
    the bottom / right to a black size x size square.

    Args:
        image: (H, W, 3) uint8 RGB.
    Returns:
        (size, size, 3) uint8 and the factor from original to new pixels (boxes are multiplied by it).
    """
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = np.zeros((size, size, 3), dtype=np.uint8)
    out[:nh, :nw] = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((nw, nh), Image.BICUBIC))
    return out, scale


def load_proposals(path: str) -> Tuple[Dict[int, torch.Tensor], Dict[str, int]]:
    """Read a COCO-style proposals file.

    Returns:
        boxes by image id ((K, 4) xyxy; (0, 4) for an image listed in "images" without proposals), and image id
        by file basename (from "images", when present) so that datasets without COCO ids (image folders) can be
        matched by file name.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"INPUT.CLIPSELF.PROPOSAL_FILE={path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    anns = data.get("annotations") if isinstance(data, dict) else None
    if anns is None:
        raise ValueError(f"proposals file {path!r} is not COCO-style: no 'annotations' list")
    by_image = defaultdict(list)
    for i, a in enumerate(anns):
        if "image_id" not in a or len(a.get("bbox", ())) != 4:
            raise ValueError(f"proposals file {path!r}: annotation {i} needs 'image_id' and 'bbox' [x, y, w, h]")
        x, y, w, h = a["bbox"]
        by_image[a["image_id"]].append([x, y, x + w, y + h])
    boxes = {k: torch.tensor(v, dtype=torch.float32).reshape(-1, 4) for k, v in by_image.items()}
    for im in data.get("images", []):
        if "id" in im:
            boxes.setdefault(im["id"], torch.zeros(0, 4))
    ids_by_name = {os.path.basename(im["file_name"]): im["id"] for im in data.get("images", []) if "file_name" in im}
    return boxes, ids_by_name


def resize_longest(height: int, width: int, size: int) -> T.ResizeTransform:
    """The resize making the longest side `size` (up or down), aspect kept (region-recognition test images)."""
    scale = size / max(height, width)
    new_h, new_w = max(1, int(round(height * scale))), max(1, int(round(width * scale)))
    return T.ResizeTransform(height, width, new_h, new_w, Image.BILINEAR)


def _read_rgb(dataset_dict: dict, image_format: str) -> np.ndarray:
    image = read_image(dataset_dict["file_name"], format=image_format)  # (H, W, 3); 16-bit grey scaled, not clipped
    utils.check_image_size(dataset_dict, image)
    return image


# ---------------------------------------------------------------------------------------------- mappers
class CLIPSelfDatasetMapper:
    """Training mapper of `CLIPSelfDistiller`.

    Output per image, as CLIPSelf's data pipeline: "image" (3, s, s) uint8, the image with its longest side
    resized to one of `sizes` (s) on a black square (`letterbox`), "region_boxes" (K, 4) float xyxy in that
    image's pixels, "crops" (K, 3, S, S) uint8 teacher crops of the same regions (enlarged by `crop_scale`) cut
    from the original image (`crop_regions`). 1 <= K <= max_regions.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, image_format: str = "RGB", region_source: str = "patches",
                 sizes: Sequence[int] = (1024,), crop_size: int = 224, crop_scale: float = 1.0,
                 max_regions: int = 20, grid_max_split: int = 6, grid_max_aspect: float = 2.0,
                 proposal_file: str = "", proposal_min_size: float = 8.0, proposal_max_size: float = 1024.0):
        if region_source not in REGION_SOURCES:
            raise ValueError(f"INPUT.CLIPSELF.REGION_SOURCE={region_source!r}; use one of {list(REGION_SOURCES)}")
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"INPUT.CLIPSELF.SIZES must be a non-empty list of positive sizes, got {sizes}")
        if crop_size < 1 or max_regions < 1 or crop_scale < 1.0:
            raise ValueError(f"need CROP_SIZE >= 1, MAX_REGIONS >= 1, CROP_SCALE >= 1 "
                             f"(got {crop_size}, {max_regions}, {crop_scale})")
        self.is_train = is_train
        self.image_format = image_format
        self.region_source = region_source
        self.sizes = list(sizes)
        self.crop_size = crop_size
        self.crop_scale = crop_scale
        self.max_regions = max_regions
        self.choices = grid_choices(grid_max_split, grid_max_aspect)
        self.proposal_min_size, self.proposal_max_size = proposal_min_size, proposal_max_size
        self.proposals: Dict[int, torch.Tensor] = {}
        self.proposal_ids_by_name: Dict[str, int] = {}
        if region_source == "proposals":
            if not proposal_file:
                raise ValueError("INPUT.CLIPSELF.REGION_SOURCE='proposals' needs INPUT.CLIPSELF.PROPOSAL_FILE")
            self.proposals, self.proposal_ids_by_name = load_proposals(proposal_file)
        self.proposal_file = proposal_file

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        c = cfg.INPUT.CLIPSELF
        return {
            "is_train": is_train, "image_format": cfg.INPUT.FORMAT, "region_source": c.REGION_SOURCE,
            "sizes": list(c.SIZES), "crop_size": c.CROP_SIZE, "crop_scale": c.CROP_SCALE,
            "max_regions": c.MAX_REGIONS, "grid_max_split": c.GRID_MAX_SPLIT, "grid_max_aspect": c.GRID_MAX_ASPECT,
            "proposal_file": c.PROPOSAL_FILE, "proposal_min_size": c.PROPOSAL_MIN_SIZE,
            "proposal_max_size": c.PROPOSAL_MAX_SIZE,
        }

    def proposals_of(self, dataset_dict: dict) -> torch.Tensor:
        """The (K, 4) xyxy proposals of an image, found by image id, else by file name."""
        key = dataset_dict.get("image_id")
        if key not in self.proposals:
            key = self.proposal_ids_by_name.get(os.path.basename(dataset_dict["file_name"]), key)
        if key not in self.proposals:
            raise KeyError(f"image {dataset_dict['file_name']!r} (image_id {dataset_dict.get('image_id')!r}) is not "
                           f"in INPUT.CLIPSELF.PROPOSAL_FILE={self.proposal_file!r}: the file must list every training "
                           "image, by COCO image id or (in its 'images') by file name")
        return self.proposals[key]

    def shuffled(self, boxes: torch.Tensor) -> torch.Tensor:
        """At most max_regions of (K, 4) boxes in random order (CLIPSelf: `random.shuffle`, then the first ones)."""
        order = list(range(len(boxes)))
        random.shuffle(order)
        return boxes[torch.tensor(order[:self.max_regions], dtype=torch.int64)].reshape(-1, 4)

    def regions(self, dataset_dict: dict, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The distillation regions of one image in original pixels: (K, 4) xyxy boxes the student pools and the
        (K, 4) boxes the teacher's crops are cut at; 1 <= K <= max_regions.

        Patches: cells of a random grid, at most max_regions of them drawn. Proposals (CLIPSelf's order): draw
        max_regions, then drop those whose area w * h is outside [min_size^2, max_size^2]; if none is left, the
        image's top-left quarter.
        """
        if self.region_source == "patches":
            rows, cols = random.choice(self.choices)
            boxes = self.shuffled(grid_boxes(height, width, rows, cols))
            return boxes, scale_boxes(boxes, self.crop_scale, height, width)
        boxes = self.shuffled(self.proposals_of(dataset_dict))
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        boxes = boxes[(area >= self.proposal_min_size ** 2) & (area <= self.proposal_max_size ** 2)]
        if len(boxes) == 0:  # CLIPSelf's fallback: the crop's corner is whole pixels, the student's box is not
            return (torch.tensor([[0.0, 0.0, width / 4, height / 4]]),
                    torch.tensor([[0.0, 0.0, float(width // 4), float(height // 4)]]))
        return boxes, scale_boxes(boxes, self.crop_scale, height, width)

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = dict(dataset_dict)
        image = _read_rgb(dataset_dict, self.image_format)
        h, w = image.shape[:2]
        boxes, crop_boxes = self.regions(dataset_dict, h, w)  # (K, 4), original pixels
        crops = crop_regions(image, crop_boxes, self.crop_size)
        student, scale = letterbox(image, random.choice(self.sizes))
        dataset_dict["image"] = image_to_tensor(student)
        dataset_dict["region_boxes"] = (boxes * scale).float()
        dataset_dict["crops"] = crops
        dataset_dict.pop("annotations", None)
        return dataset_dict


def _mask_box(mask: np.ndarray) -> Optional[List[float]]:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


class RegionRecognitionDatasetMapper:
    """Test mapper of the region-recognition evaluation on COCO-panoptic-format datasets (dataset dicts with
    "pan_seg_file_name" and "segments_info", as detectron2's `load_coco_panoptic_json` gives).

    Output per image: "image" (3, h, w) uint8 (longest side `size`), "height"/"width" of the original,
    "region_boxes" (K, 4) tight boxes of the segments in resized pixels, "region_masks" (K, h, w) bool,
    "region_classes" (K,) contiguous class ids, "region_isthing" (K,) bool.
    """

    @configurable
    def __init__(self, is_train: bool = False, *, image_format: str = "RGB", size: int = 1024,
                 min_size: float = 8.0):
        if size < 1:
            raise ValueError(f"INPUT.REGION_RECOGNITION.SIZE must be positive, got {size}")
        self.image_format = image_format
        self.size = size
        self.min_size = min_size

    @classmethod
    def from_config(cls, cfg, is_train: bool = False):
        return {"is_train": is_train, "image_format": cfg.INPUT.FORMAT, "size": cfg.INPUT.REGION_RECOGNITION.SIZE,
                "min_size": cfg.INPUT.REGION_RECOGNITION.MIN_SIZE}

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = dict(dataset_dict)
        if "pan_seg_file_name" not in dataset_dict or "segments_info" not in dataset_dict:
            raise ValueError(
                f"region recognition needs panoptic ground truth ('pan_seg_file_name', 'segments_info'); "
                f"{dataset_dict.get('file_name')!r} has keys {sorted(dataset_dict)}"
            )
        image = _read_rgb(dataset_dict, self.image_format)
        h, w = image.shape[:2]
        pan = rgb2id(utils.read_image(dataset_dict["pan_seg_file_name"], "RGB"))  # (H, W)
        if pan.shape != (h, w):
            raise ValueError(f"panoptic PNG {dataset_dict['pan_seg_file_name']!r} is {pan.shape}, image is {(h, w)}")
        tfm = resize_longest(h, w, self.size)
        pan_small = tfm.apply_segmentation(pan.astype(np.float64)).astype(np.int64)  # nearest
        boxes, masks, classes, isthing = [], [], [], []
        for seg in dataset_dict["segments_info"]:
            box = _mask_box(pan == seg["id"])
            if box is None or (box[2] - box[0]) * (box[3] - box[1]) < self.min_size ** 2:
                continue
            boxes.append(box)
            masks.append(pan_small == seg["id"])
            classes.append(seg["category_id"])
            isthing.append(bool(seg.get("isthing", True)))
        resized = tfm.apply_image(image)
        nh, nw = resized.shape[:2]
        dataset_dict["image"] = image_to_tensor(resized)
        dataset_dict["region_boxes"] = torch.as_tensor(
            tfm.apply_box(np.array(boxes, dtype=np.float64).reshape(-1, 4)), dtype=torch.float32).reshape(-1, 4)
        dataset_dict["region_masks"] = torch.as_tensor(np.stack(masks) if masks else np.zeros((0, nh, nw), bool))
        dataset_dict["region_classes"] = torch.as_tensor(classes, dtype=torch.int64)
        dataset_dict["region_isthing"] = torch.as_tensor(isthing, dtype=torch.bool)
        return dataset_dict


# ---------------------------------------------------------------------------------------------- image folders
def image_folder_dicts(folder: str) -> List[dict]:
    """detectron2 dataset dicts (file_name, image_id, height, width) of every image under `folder`."""
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(folder) for f in names
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise ValueError(f"image folder {folder!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for i, path in enumerate(files):
        with Image.open(path) as im:
            w, h = im.size
        out.append({"file_name": path, "image_id": i, "height": h, "width": w})
    return out


def register_image_folders(names: Sequence[str]) -> None:
    """Register each name in `names` that is a directory (and not a registered dataset yet) as an image-folder
    dataset under that same name, so that DATASETS.TRAIN can list plain folders next to registered datasets."""
    for name in names:
        if name in DatasetCatalog.list() or not os.path.isdir(name):
            continue
        folder = os.path.abspath(name)
        DatasetCatalog.register(name, lambda folder=folder: image_folder_dicts(folder))
        MetadataCatalog.get(name).set(image_root=folder)
        logger.info("Registered image folder %s as a dataset", folder)
