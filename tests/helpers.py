"""Plain helpers shared by the tests (fixtures live in conftest.py)."""
import socket

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
