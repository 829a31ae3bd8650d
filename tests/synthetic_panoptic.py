"""A miniature open-vocabulary panoptic dataset made by the tests: coloured shapes ("things") on a textured
two-part background ("stuff"), written in COCO-panoptic format (PNG + JSON) plus semantic label maps, and
registered like ovseg's real panoptic benchmarks (Mask2Former's metadata convention)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from torch import nn

# (name, isthing, RGB colour of the pixels); category ids are 1-based positions in this list
CATEGORIES = [
    ("sky", False, (90, 150, 230)),
    ("ground", False, (120, 80, 40)),
    ("red circle", True, (230, 30, 30)),
    ("green square", True, (30, 200, 40)),
    ("blue triangle", True, (20, 30, 220)),
    ("yellow circle", True, (240, 230, 20)),  # held out of training
]
HELD_OUT = ("yellow circle",)


def _shape_mask(kind: str, h: int, w: int, cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    if kind == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if kind == "square":
        return (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
    # triangle pointing up: inside when below the two slanted edges and above the base
    return (yy <= cy + r) & (yy - (cy - r) >= 2 * abs(xx - cx))


def make_image(rng: np.random.Generator, classes: Sequence[str], size: int = 96):
    """One image: (H, W, 3) uint8, (H, W) segment ids (0 = none), [(segment id, category name)]."""
    h = w = size
    names = [c[0] for c in CATEGORIES]
    colour = {c[0]: np.array(c[2]) for c in CATEGORIES}
    image = np.zeros((h, w, 3), np.float64)
    seg = np.zeros((h, w), np.int64)
    horizon = int(rng.integers(h // 3, 2 * h // 3))
    image[:horizon] = colour["sky"]
    image[horizon:] = colour["ground"]
    seg[:horizon], seg[horizon:] = 1, 2
    segments = [(1, "sky"), (2, "ground")]
    things = [c for c in classes if CATEGORIES[names.index(c)][1]]
    for k in range(int(rng.integers(1, 3)) + 1):
        name = things[int(rng.integers(len(things)))]
        r = int(rng.integers(size // 9, size // 6))
        cy, cx = (int(rng.integers(r, size - r)) for _ in range(2))
        m = _shape_mask(name.split()[-1], h, w, cy, cx, r)
        image[m] = colour[name]
        sid = 3 + k
        seg[m] = sid
        segments.append((sid, name))
    image += rng.normal(0, 12, image.shape)  # texture
    image = np.clip(image, 0, 255).astype(np.uint8)
    segments = [(sid, n) for sid, n in segments if (seg == sid).any()]
    return image, seg, segments


def write_split(root: Path, split: str, n: int, classes: Sequence[str], seed: int, size: int = 96) -> Dict:
    """Write images, panoptic PNGs, a panoptic JSON and semantic label maps; returns paths."""
    rng = np.random.default_rng(seed)
    names = [c[0] for c in CATEGORIES]
    contiguous = {names.index(c) + 1: i for i, c in enumerate(classes)}  # dataset id -> index in `classes`
    img_dir, pan_dir, sem_dir = (root / f"{split}_{k}" for k in ("images", "panoptic", "semantic"))
    for d in (img_dir, pan_dir, sem_dir):
        d.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        image, seg, segments = make_image(rng, classes, size)
        stem = f"{split}_{i:04d}"
        Image.fromarray(image).save(img_dir / f"{stem}.jpg", quality=95)
        pan_ids = np.zeros_like(seg)
        sem = np.full(seg.shape, 255, np.uint8)
        info = []
        for sid, name in segments:
            cat = names.index(name) + 1
            pid = sid * 37  # panoptic ids need not be small or dense
            m = seg == sid
            pan_ids[m] = pid
            sem[m] = contiguous[cat]
            ys, xs = np.nonzero(m)
            info.append({"id": pid, "category_id": cat, "iscrowd": 0, "area": int(m.sum()),
                         "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                  int(ys.max() - ys.min() + 1)]})
        rgb = np.stack([pan_ids % 256, pan_ids // 256 % 256, pan_ids // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(pan_dir / f"{stem}.png")
        Image.fromarray(sem).save(sem_dir / f"{stem}.png")
        images.append({"id": i, "file_name": f"{stem}.jpg", "height": size, "width": size})
        annotations.append({"image_id": i, "file_name": f"{stem}.png", "segments_info": info})
    cats = [{"id": names.index(c) + 1, "name": c, "isthing": int(CATEGORIES[names.index(c)][1]),
             "supercategory": "shape"} for c in classes]
    json_file = root / f"{split}_panoptic.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return {"image_dir": str(img_dir), "pan_dir": str(pan_dir), "sem_dir": str(sem_dir), "json": str(json_file),
            "contiguous": contiguous}


def _load(paths: Dict) -> List[Dict]:
    with open(paths["json"]) as f:
        data = json.load(f)
    contiguous = paths["contiguous"]
    records = []
    for img, ann in zip(data["images"], data["annotations"]):
        segs = [dict(s, category_id=contiguous[s["category_id"]], isthing=CATEGORIES[s["category_id"] - 1][1])
                for s in ann["segments_info"]]
        stem = os.path.splitext(ann["file_name"])[0]
        records.append({"file_name": os.path.join(paths["image_dir"], img["file_name"]), "image_id": img["id"],
                        "height": img["height"], "width": img["width"],
                        "pan_seg_file_name": os.path.join(paths["pan_dir"], ann["file_name"]),
                        "sem_seg_file_name": os.path.join(paths["sem_dir"], stem + ".png"), "segments_info": segs})
    return records


def register_split(name: str, paths: Dict, classes: Sequence[str]) -> None:
    """Register in detectron2's catalogs with the metadata ovseg's panoptic benchmarks carry."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    names = [c[0] for c in CATEGORIES]
    DatasetCatalog.register(name, lambda: _load(paths))
    things = {names.index(c) + 1: i for i, c in enumerate(classes) if CATEGORIES[names.index(c)][1]}
    MetadataCatalog.get(name).set(
        evaluator_type="coco_panoptic_seg", ignore_label=255, label_divisor=1000,
        vocabulary=list(classes), stuff_classes=list(classes),
        stuff_colors=[list(CATEGORIES[names.index(c)][2]) for c in classes],
        thing_classes=[c for c in classes if CATEGORIES[names.index(c)][1]],
        thing_dataset_id_to_contiguous_id=things,
        stuff_dataset_id_to_contiguous_id=dict(paths["contiguous"]),
        panoptic_root=paths["pan_dir"], panoptic_json=paths["json"], image_root=paths["image_dir"],
        sem_seg_root=paths["sem_dir"],
    )


def make_dataset(root: Path, n_train: int = 32, n_val: int = 8, size: int = 96, prefix: str = "synth_pan"):
    """Train split without the held-out classes (vocabulary without them), val split with every class."""
    all_classes = [c[0] for c in CATEGORIES]
    train_classes = [c for c in all_classes if c not in HELD_OUT]
    train = write_split(root, "train", n_train, train_classes, seed=1, size=size)
    val = write_split(root, "val", n_val, all_classes, seed=2, size=size)
    register_split(f"{prefix}_train", train, train_classes)
    register_split(f"{prefix}_val", val, all_classes)
    return f"{prefix}_train", f"{prefix}_val"


class ColourText(nn.Module):
    """A text space with structure, as CLIP's has: a class name's embedding is the centred RGB colour of the shape it
    names here, zero-padded to `dim`. (The tiny CLIP's random text tower has none: there, an unseen name's embedding
    says nothing about how it looks.) Stands in for a model's `text_classifier`: `forward` gives one embedding per
    class, `template_embeddings` the same under each of `prompts` templates (CAT-Seg's cost-volume channels)."""

    def __init__(self, dim: int, prompts: int = 1):
        super().__init__()
        self.dim, self.prompts = dim, prompts
        self.text_model = nn.Module()  # no weights: nothing of the stand-in trains
        self.colour = {name: torch.tensor(rgb, dtype=torch.float32) - 128.0 for name, _, rgb in CATEGORIES}

    def forward(self, vocabulary) -> torch.Tensor:
        rows = [F.pad(self.colour[name], (0, self.dim - 3)) for name in vocabulary.names]
        return F.normalize(torch.stack(rows), dim=-1)

    def template_embeddings(self, vocabulary, synonyms: str = "first") -> torch.Tensor:
        return self(vocabulary)[:, None].expand(-1, self.prompts, -1)
