"""Plain helpers shared by the tests (fixtures live in conftest.py)."""
import socket

import numpy as np
from PIL import Image

from ovseg.modeling.tiny_models import TINY_EVA, TINY_VIT

TINY_MODELS = [TINY_VIT, TINY_EVA]


def tiny_cfg(**overrides):
    """An ovseg config for the tiny random CLIP on CPU, with dotted-key overrides."""
    from ovseg.config import get_ovseg_cfg

    cfg = get_ovseg_cfg()
    cfg.MODEL.META_ARCHITECTURE = "CLIPDenseSegmentor"
    cfg.MODEL.CLIP.MODEL_NAME = TINY_VIT
    cfg.MODEL.CLIP.PRETRAINED = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.TEXT.TEMPLATES = "simple"
    opts = []
    for k, v in overrides.items():
        opts += [k.replace("__", "."), v]
    cfg.merge_from_list(opts)
    return cfg


def free_dist_url() -> str:
    """`--dist-url` on a port free now: detectron2's default port is fixed per user, so two multi-process runs on one
    machine at once (two test sessions) would collide on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def random_sem_seg_record(folder, height: int, width: int, ignored_rows: int) -> dict:
    """A detectron2 semantic-segmentation record of a random RGB image and a random 4-class label map (its first
    `ignored_rows` rows 255), written as PNGs into `folder`."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = rng.integers(0, 4, (height, width), dtype=np.uint8)
    label[:ignored_rows] = 255
    Image.fromarray(image).save(folder / "img.png")
    Image.fromarray(label).save(folder / "lbl.png")
    return {"file_name": str(folder / "img.png"), "sem_seg_file_name": str(folder / "lbl.png"),
            "height": height, "width": width}
