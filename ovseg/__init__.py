"""ovseg: open-vocabulary segmentation with CLIP / CLIPSelf on Detectron2."""
__version__ = "0.1.0"

from . import modeling  # noqa: E402,F401  (registers ovseg's models in detectron2's registries)
from .config import add_ovseg_config, get_ovseg_cfg  # noqa: E402

__all__ = ["add_ovseg_config", "get_ovseg_cfg", "modeling"]
