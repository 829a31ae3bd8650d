"""The benchmarks ovseg registers in detectron2's catalogs: one table, one registration function.

Every dataset lives under `$DETECTRON2_DATASETS` (default `datasets/`) in the layout that detectron2, Mask2Former
and FC-CLIP users already have (see `datasets/README.md`). Registration reads only the packaged class lists; the
dataset folders are looked at when a dataset is loaded (`DatasetCatalog.get`), and a missing one is reported with
its expected path and the `datasets/prepare_*.py` command that creates it.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json

from .class_table import BACKGROUND, ClassEntry, class_list_path, load_class_table, seen_class_mask

logger = logging.getLogger(__name__)

SEM_SEG = "sem_seg"
COCO_PANOPTIC = "coco_panoptic_seg"
ADE20K_PANOPTIC = "ade20k_panoptic_seg"  # panoptic + semantic + instance, as in Mask2Former
INSTANCE = "coco"
PANOPTIC_TYPES = (COCO_PANOPTIC, ADE20K_PANOPTIC)


@dataclass(frozen=True)
class Benchmark:
    """One registered split. Paths are relative to the datasets root."""

    name: str
    table: str  # class list in ovseg/data/class_lists/ (`<table>.json` facts + `<table>.txt` vocabulary)
    image_dir: str
    prepare: str  # the command that creates this split's prepared files from the official download
    sem_seg_dir: str = ""  # label maps holding contiguous class ids and `ignore_label`
    label_ext: str = "png"
    image_ext: str = "jpg"
    # label map `<stem><label_suffix>.<label_ext>` pairs with image `<stem><image_suffix>.<image_ext>`, both at the
    # same path relative to their folder (sub-folders such as Cityscapes' cities are searched)
    label_suffix: str = ""
    image_suffix: str = ""
    panoptic_json: str = ""  # COCO panoptic format, category ids = the table's `id`
    panoptic_dir: str = ""
    instance_json: str = ""  # COCO instance format (things only), category ids = the table's `id`
    ignore_label: int = 255
    evaluator_type: str = SEM_SEG
    first_class: int = 0  # classes of the table before this index are not part of the benchmark (VOC-20)
    things_only: bool = False  # only the table's thing classes, in table order (COCO-Object)
    with_background: bool = False  # class 0 is `background` (not in the table), the table's classes follow (PC-60)
    # image_dir also holds other splits' images (VOC's JPEGImages): the label folder alone defines the split, so an
    # image without a label map cannot be told from another split's image
    shared_image_dir: bool = False


_ADE = "ADEChallengeData2016"
_ADE_PREP = "python datasets/prepare_ade20k_150.py"
_PC_PREP = "python datasets/prepare_pascal_context.py"
_VOC_PREP = "python datasets/prepare_pascal_voc.py"

BENCHMARKS: Tuple[Benchmark, ...] = (
    Benchmark("ade20k_150_sem_seg_train", "ade20k_150", f"{_ADE}/images/training", _ADE_PREP,
              sem_seg_dir=f"{_ADE}/annotations_detectron2/training"),
    Benchmark("ade20k_150_sem_seg_val", "ade20k_150", f"{_ADE}/images/validation", _ADE_PREP,
              sem_seg_dir=f"{_ADE}/annotations_detectron2/validation"),
    Benchmark("ade20k_150_panoptic_val", "ade20k_150", f"{_ADE}/images/validation", _ADE_PREP,
              sem_seg_dir=f"{_ADE}/annotations_detectron2/validation",
              panoptic_json=f"{_ADE}/ade20k_panoptic_val.json", panoptic_dir=f"{_ADE}/ade20k_panoptic_val",
              instance_json=f"{_ADE}/ade20k_instance_val.json", evaluator_type=ADE20K_PANOPTIC),
    Benchmark("ade20k_150_instance_val", "ade20k_150", f"{_ADE}/images/validation", _ADE_PREP,
              instance_json=f"{_ADE}/ade20k_instance_val.json", evaluator_type=INSTANCE),
    Benchmark("ade20k_847_sem_seg_val", "ade20k_847", "ADE20K_2021_17_01/images_detectron2/validation",
              "python datasets/prepare_ade20k_847.py",
              sem_seg_dir="ADE20K_2021_17_01/annotations_detectron2/validation", label_ext="tif",
              ignore_label=65535),
    Benchmark("pascal_context_59_sem_seg_val", "pascal_context_59", "VOCdevkit/VOC2010/JPEGImages", _PC_PREP,
              sem_seg_dir="VOCdevkit/VOC2010/annotations_detectron2/pc59_val", shared_image_dir=True),
    Benchmark("pascal_context_459_sem_seg_val", "pascal_context_459", "VOCdevkit/VOC2010/JPEGImages", _PC_PREP,
              sem_seg_dir="VOCdevkit/VOC2010/annotations_detectron2/pc459_val", label_ext="tif",
              ignore_label=65535, shared_image_dir=True),
    Benchmark("pascal_context_60_sem_seg_val", "pascal_context_59", "VOCdevkit/VOC2010/JPEGImages", _PC_PREP,
              sem_seg_dir="VOCdevkit/VOC2010/annotations_detectron2/pc60_val", with_background=True,
              shared_image_dir=True),
    Benchmark("pascal_voc_20_sem_seg_val", "pascal_voc_21", "VOCdevkit/VOC2012/JPEGImages", _VOC_PREP,
              sem_seg_dir="VOCdevkit/VOC2012/annotations_detectron2/voc20_val", first_class=1, shared_image_dir=True),
    Benchmark("pascal_voc_21_sem_seg_val", "pascal_voc_21", "VOCdevkit/VOC2012/JPEGImages", _VOC_PREP,
              sem_seg_dir="VOCdevkit/VOC2012/annotations_detectron2/voc21_val", shared_image_dir=True),
    *(
        Benchmark(f"coco_2017_{split}_panoptic_with_sem_seg", "coco_panoptic_133", f"coco/{split}2017",
                  "python datasets/prepare_coco_panoptic.py",
                  sem_seg_dir=f"coco/panoptic_semseg_{split}2017",
                  panoptic_json=f"coco/annotations/panoptic_{split}2017.json",
                  panoptic_dir=f"coco/panoptic_{split}2017",
                  instance_json=f"coco/annotations/instances_{split}2017.json", evaluator_type=COCO_PANOPTIC)
        for split in ("train", "val")
    ),
    *(
        Benchmark(f"coco_stuff_164k_sem_seg_{split}", "coco_stuff_171", f"coco/{split}2017",
                  "python datasets/prepare_coco_stuff.py",
                  sem_seg_dir=f"coco/stuffthingmaps_detectron2/{split}2017")
        for split in ("train", "val")
    ),
    # SCLIP / ClearCLIP / NACLIP's COCO-Object: background + the 80 things, from the val2017 instance annotations
    Benchmark("coco_object_sem_seg_val", "coco_panoptic_133", "coco/val2017", "python datasets/prepare_coco_object.py",
              sem_seg_dir="coco/coco_object_detectron2/val2017", things_only=True, with_background=True),
    # not detectron2's `cityscapes_fine_sem_seg_val` (cityscapesScripts evaluator): the same trainId maps, mIoU here
    Benchmark("cityscapes_19_sem_seg_val", "cityscapes_19", "cityscapes/leftImg8bit/val",
              "python datasets/prepare_cityscapes.py", sem_seg_dir="cityscapes/gtFine/val",
              label_suffix="_gtFine_labelTrainIds", image_suffix="_leftImg8bit", image_ext="png"),
)

BENCHMARKS_BY_NAME: Dict[str, Benchmark] = {b.name: b for b in BENCHMARKS}


def default_root() -> str:
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def _require(path: str, bench: Benchmark, what: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"dataset {bench.name!r}: {what} not found at {path!r}. Download the benchmark and run "
            f"`{bench.prepare}` (with DETECTRON2_DATASETS pointing at the datasets root); layouts: datasets/README.md"
        )


def missing_record_files(records: List[dict], keys: Sequence[str]) -> List[Tuple[str, str]]:
    """(key, path) of every file a dataset record names under `keys` that does not exist (one stat per file: a
    JSON listing files that were never extracted would otherwise shrink or break evaluation much later)."""
    return [(key, r[key]) for r in records for key in keys if key in r and not os.path.exists(r[key])]


def _require_record_files(bench: Benchmark, records: List[dict], keys: Sequence[str], source: str) -> None:
    missing = missing_record_files(records, keys)
    if missing:
        key, path = missing[0]
        raise FileNotFoundError(
            f"dataset {bench.name!r}: {len(missing)} file(s) listed in {source!r} are missing, e.g. {key} {path!r}. "
            f"Re-run `{bench.prepare}` (layouts: datasets/README.md)."
        )


def check_benchmark_files(name: str) -> None:
    """For a dataset of the table: the clear missing-dataset error now, from its registered paths alone (loading
    it would find out later, e.g. after the weights download or a whole training run). Other names: nothing."""
    bench = BENCHMARKS_BY_NAME.get(name)
    if bench is None or name not in MetadataCatalog.list():
        return
    meta = MetadataCatalog.get(name)
    needed = [("sem_seg_root", "label folder"), ("panoptic_json", "panoptic JSON"),
              ("panoptic_root", "panoptic PNG folder"), ("image_root", "image folder")]
    if bench.evaluator_type == INSTANCE:  # elsewhere the instance JSON is optional (instance AP when present)
        needed.append(("json_file", "instance JSON"))
    for key, what in needed:
        if meta.get(key, None):
            _require(meta.get(key), bench, what)


def _classes(bench: Benchmark) -> Tuple[ClassEntry, ...]:
    classes = load_class_table(bench.table)[bench.first_class:]
    if bench.things_only:
        classes = tuple(c for c in classes if c.isthing)
    return ((BACKGROUND,) if bench.with_background else ()) + classes


def benchmark_classes(name: str) -> Tuple[ClassEntry, ...]:
    """The classes of a registered benchmark in contiguous-id order (label value i = entry i)."""
    return _classes(BENCHMARKS_BY_NAME[name])


def files_under(folder: str, suffix: str) -> List[str]:
    """Sorted paths relative to `folder` of the files ending in `suffix` in it and its sub-folders (hidden ones
    skipped)."""
    found = []
    for sub, subdirs, files in os.walk(folder):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        rel = os.path.relpath(sub, folder)
        found += [os.path.normpath(os.path.join(rel, f)) for f in files if f.endswith(suffix) and f[0] != "."]
    return sorted(found)


def load_semantic(bench: Benchmark, root: str) -> List[dict]:
    """Pair every label map of `sem_seg_dir` with the image of the same stem (and relative folder) in `image_dir`."""
    image_dir = os.path.join(root, bench.image_dir)
    gt_dir = os.path.join(root, bench.sem_seg_dir)
    _require(gt_dir, bench, "label folder")
    _require(image_dir, bench, "image folder")
    label_end = f"{bench.label_suffix}.{bench.label_ext}"
    gt_files = files_under(gt_dir, label_end)
    if not gt_files:
        raise FileNotFoundError(f"dataset {bench.name!r}: no *{label_end} label maps in {gt_dir!r}; "
                                f"run `{bench.prepare}`")
    image_end = f"{bench.image_suffix}.{bench.image_ext}"
    stems = [gt[: -len(label_end)] for gt in gt_files]
    records = [{"file_name": os.path.join(image_dir, stem + image_end), "sem_seg_file_name": os.path.join(gt_dir, gt),
                "image_id": os.path.basename(stem)} for stem, gt in zip(stems, gt_files)]
    if bench.shared_image_dir:
        without_image = [r["file_name"] for r in records if not os.path.isfile(r["file_name"])]
        without_label = []
    else:  # the folder holds exactly this split: every image needs its label map, or evaluation silently shrinks
        image_stems = {f[: -len(image_end)] for f in files_under(image_dir, image_end)}
        without_image = [r["file_name"] for s, r in zip(stems, records) if s not in image_stems]
        without_label = sorted(image_stems.difference(stems))
    if without_label:
        raise FileNotFoundError(
            f"dataset {bench.name!r}: {len(without_label)} image(s) in {image_dir!r} have no label map in {gt_dir!r}, "
            f"e.g. {os.path.join(gt_dir, without_label[0] + label_end)!r} is missing for "
            f"{os.path.join(image_dir, without_label[0] + image_end)!r}. Re-run `{bench.prepare}`, or remove the "
            "unlabelled images from the image folder."
        )
    if without_image:
        raise FileNotFoundError(
            f"dataset {bench.name!r}: {len(without_image)} label map(s) in {gt_dir!r} have no image, e.g. "
            f"{without_image[0]!r} is missing. Re-run `{bench.prepare}` (layouts: datasets/README.md)."
        )
    logger.info("Loaded %d images with semantic labels from %s", len(records), gt_dir)
    return records


def load_panoptic(bench: Benchmark, root: str) -> List[dict]:
    """COCO-panoptic JSON + PNGs (+ semantic label maps when the row has them) in detectron2's format."""
    json_file = os.path.join(root, bench.panoptic_json)
    pan_dir = os.path.join(root, bench.panoptic_dir)
    image_dir = os.path.join(root, bench.image_dir)
    _require(json_file, bench, "panoptic JSON")
    _require(pan_dir, bench, "panoptic PNG folder")
    _require(image_dir, bench, "image folder")
    sem_dir = os.path.join(root, bench.sem_seg_dir) if bench.sem_seg_dir else ""
    if sem_dir:
        _require(sem_dir, bench, "semantic label folder")
    meta = MetadataCatalog.get(bench.name)
    things, stuff = meta.thing_dataset_id_to_contiguous_id, meta.stuff_dataset_id_to_contiguous_id
    with open(json_file, encoding="utf-8") as f:
        data = json.load(f)
    image_files = {img["id"]: img["file_name"] for img in data.get("images", [])}
    records = []
    for ann in data["annotations"]:
        segments = []
        for seg in ann["segments_info"]:
            seg = dict(seg)
            isthing = seg["category_id"] in things
            seg["category_id"] = (things if isthing else stuff)[seg["category_id"]]
            seg["isthing"] = isthing
            segments.append(seg)
        stem = os.path.splitext(ann["file_name"])[0]
        image = image_files.get(ann["image_id"], f"{stem}.{bench.image_ext}")
        record = {
            "file_name": os.path.join(image_dir, image),
            "image_id": ann["image_id"],
            "pan_seg_file_name": os.path.join(pan_dir, ann["file_name"]),
            "segments_info": segments,
        }
        if sem_dir:
            record["sem_seg_file_name"] = os.path.join(sem_dir, stem + ".png")
        records.append(record)
    if not records:
        raise ValueError(f"dataset {bench.name!r}: {json_file!r} has no annotations")
    _require_record_files(bench, records, ("file_name", "pan_seg_file_name", "sem_seg_file_name"), json_file)
    return records


def load_instances(bench: Benchmark, root: str) -> List[dict]:
    """COCO instance JSON with category ids mapped to the row's contiguous thing ids."""
    json_file = os.path.join(root, bench.instance_json)
    image_dir = os.path.join(root, bench.image_dir)
    _require(json_file, bench, "instance JSON")
    _require(image_dir, bench, "image folder")
    id_map = MetadataCatalog.get(bench.name).thing_dataset_id_to_contiguous_id
    records = load_coco_json(json_file, image_dir)  # no dataset name: leaves the metadata to us
    for record in records:
        for obj in record.get("annotations", []):
            obj["category_id"] = id_map[obj["category_id"]]
    _require_record_files(bench, records, ("file_name",), json_file)
    return records


def _loader(bench: Benchmark, root: str):
    if bench.evaluator_type in PANOPTIC_TYPES:
        return lambda: load_panoptic(bench, root)
    if bench.evaluator_type == INSTANCE:
        return lambda: load_instances(bench, root)
    return lambda: load_semantic(bench, root)


def benchmark_metadata(bench: Benchmark, root: str) -> dict:
    """Everything `MetadataCatalog.get(bench.name)` holds for a row (paths joined to `root`, nothing read)."""
    classes = _classes(bench)
    vocabulary = [c.vocabulary_entry for c in classes]
    seen = seen_class_mask(vocabulary)
    meta = {
        "evaluator_type": bench.evaluator_type,
        "ignore_label": bench.ignore_label,
        "image_root": os.path.join(root, bench.image_dir),
        "class_list": class_list_path(bench.table),
        "prepare_command": bench.prepare,
        "vocabulary": vocabulary,
        "seen_classes": [c.name for c, s in zip(classes, seen) if s],
        "unseen_classes": [c.name for c, s in zip(classes, seen) if not s],
    }
    if bench.sem_seg_dir:
        meta["sem_seg_root"] = os.path.join(root, bench.sem_seg_dir)
    things = [(i, c) for i, c in enumerate(classes) if c.isthing]
    if bench.evaluator_type == INSTANCE:
        meta.update(
            thing_classes=[c.name for _, c in things],
            thing_colors=[list(c.color) for _, c in things],
            thing_dataset_id_to_contiguous_id={c.dataset_id: j for j, (_, c) in enumerate(things)},
            vocabulary=[c.vocabulary_entry for _, c in things],
            json_file=os.path.join(root, bench.instance_json),
        )
        meta["seen_classes"] = [n for n in meta["seen_classes"] if n in meta["thing_classes"]]
        meta["unseen_classes"] = [n for n in meta["unseen_classes"] if n in meta["thing_classes"]]
        return meta
    meta.update(stuff_classes=[c.name for c in classes], stuff_colors=[list(c.color) for c in classes])
    if bench.evaluator_type in PANOPTIC_TYPES:
        # Mask2Former's convention: stuff_* cover all classes (semantic view), thing_* the thing subset, both
        # mapping to contiguous ids in the same 0..C-1 space.
        meta.update(
            thing_classes=[c.name for _, c in things],
            thing_colors=[list(c.color) for _, c in things],
            thing_dataset_id_to_contiguous_id={c.dataset_id: i for i, c in things},
            stuff_dataset_id_to_contiguous_id={c.dataset_id: i for i, c in enumerate(classes)},
            panoptic_root=os.path.join(root, bench.panoptic_dir),
            panoptic_json=os.path.join(root, bench.panoptic_json),
            label_divisor=1000,
        )
        if bench.instance_json:
            meta["json_file"] = os.path.join(root, bench.instance_json)
    return meta


def register_benchmark(bench: Benchmark, root: Optional[str] = None) -> None:
    """Register one row (replacing an earlier registration of the same name, e.g. under another root)."""
    root = default_root() if root is None else os.path.expanduser(root)
    if bench.name in DatasetCatalog.list():
        DatasetCatalog.remove(bench.name)
    if bench.name in MetadataCatalog.list():
        MetadataCatalog.remove(bench.name)
    DatasetCatalog.register(bench.name, _loader(bench, root))
    MetadataCatalog.get(bench.name).set(**benchmark_metadata(bench, root))


def register_all_ovseg_datasets(root: Optional[str] = None) -> List[str]:
    """Register every benchmark of `BENCHMARKS` under `root` (default `$DETECTRON2_DATASETS`, else `datasets/`).

    Returns the registered names. Safe to call again (e.g. with another root): earlier entries are replaced.
    """
    for bench in BENCHMARKS:
        register_benchmark(bench, root)
    from .captions import register_caption_table  # captioned-image training sets (no classes, no evaluator)

    captions = register_caption_table(default_root() if root is None else os.path.expanduser(root))
    return [b.name for b in BENCHMARKS] + captions
