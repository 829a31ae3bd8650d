"""ovseg: open-vocabulary segmentation with CLIP / CLIPSelf on Detectron2."""
__version__ = "0.1.0"

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
