"""ovseg: open-vocabulary segmentation with CLIP / CLIPSelf on Detectron2."""
__version__ = "0.1.0"

import warnings

with warnings.catch_warnings():
    # fvcore and detectron2 script a few helpers when imported, and torch deprecates torch.jit.script: two warnings
    # on every command about code outside ovseg. Silenced for these imports only; later torch.jit.script calls warn.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    import detectron2.modeling  # noqa: F401
    import fvcore.nn  # noqa: F401

# importing the subpackages registers ovseg's benchmarks (detectron2 catalogs) and models (registries)
from . import data, modeling  # noqa: E402,F401
from .config import add_ovseg_config, get_ovseg_cfg  # noqa: E402

__all__ = ["Prediction", "Predictor", "add_ovseg_config", "get_ovseg_cfg", "modeling"]


def __getattr__(name):
    # the predictor pulls in detectron2's Visualizer (matplotlib): imported on first use, not by train_net.py
    if name in ("Predictor", "Prediction"):
        from . import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'ovseg' has no attribute {name!r}")
