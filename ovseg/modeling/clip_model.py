"""Building an open_clip model from `MODEL.CLIP.MODEL_NAME` / `MODEL.CLIP.PRETRAINED`.

The one place that turns a model name plus a weights spec (open_clip tag, local file, or "" for random
initialisation) into an open_clip model, with clear errors for every way that can go wrong.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
import socket
from typing import Tuple

import open_clip
import torch
from torch import nn

from ..utils.download import WeightsUnavailableError  # noqa: F401 - defined with the downloader, used here too
from ..utils.safe_load import load_weights_file
from .checkpoint_layouts import to_open_clip_layout
from .tiny_models import TINY_MODELS, register_tiny_models

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _is_path(spec: str) -> bool:
    return os.sep in spec or spec.endswith(WEIGHT_SUFFIXES) or os.path.exists(spec)


@contextlib.contextmanager
def _hub_cache_only_when_unreachable(host: str = "huggingface.co"):
    """Offline, huggingface_hub retries for about a minute before giving up; when the hub's name does not even
    resolve, go straight to the local cache (a cached download still works, a missing one fails at once)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    try:
        socket.getaddrinfo(host, 443)
        reachable = True
    except OSError:
        reachable = False
    if reachable or constants.HF_HUB_OFFLINE:
        yield
        return
    logger.warning("%s is unreachable: looking for the weights in the local cache only", host)
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def _check_model_name(model_name: str) -> None:
    names = open_clip.list_models()
    if model_name not in names:
        close = difflib.get_close_matches(model_name, names, n=5)
        raise ValueError(
            f"MODEL.CLIP.MODEL_NAME={model_name!r} is not an open_clip architecture. "
            f"Closest: {close or 'none'}; see open_clip.list_models(). ovseg's tiny test architectures "
            f"({', '.join(TINY_MODELS)}) are registered by ovseg.modeling.tiny_models.register_tiny_models(), "
            "or by naming one of them exactly."
        )


# Prefixes under which ovseg models (and DDP) keep open_clip's modules; stripping them gives open_clip keys, so a
# detectron2 checkpoint of any ovseg model (e.g. model_final.pth) is also a CLIP checkpoint.
_OVSEG_PREFIXES = ("module.", "backbone.tower.", "text_classifier.text_model.")


def _open_clip_key(key: str) -> str:
    for prefix in _OVSEG_PREFIXES:
        key = key.removeprefix(prefix)
    return key


def _named(what: str, value: str) -> str:
    """How an error names the value the user gave: `KEY='value'` for a config key, `--flag 'value'` for a flag."""
    return f"{what} {value!r}" if what.startswith("-") else f"{what}={value!r}"


def _load_file(model: nn.Module, path: str, model_name: str, trust_pickled_weights: bool = False,
               what: str = "MODEL.CLIP.PRETRAINED") -> None:
    """Load an open_clip (or ovseg-exported) state dict into `model`, reporting key mismatches; errors name the file
    as `what` (the config key or command-line flag it came from)."""
    source = _named(what, path)
    state = load_weights_file(
        path, trust_pickled=trust_pickled_weights, what=source,
        trust_hint="set MODEL.CLIP.TRUST_PICKLED_WEIGHTS True (scripts/convert_to_open_clip.py: "
                   "--trust-pickled-weights)",
    )
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source} does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    try:
        # foreign layouts first (EVA-CLIP, CLIPSelfDistiller with its teacher): strict, complete conversions
        state, layout = to_open_clip_layout(state, own.keys())
    except ValueError as e:
        raise ValueError(f"{source} for {model_name!r}: {e}") from e
    if layout:
        logger.info("Converted %s from the %s key layout to open_clip's", path, layout)
    else:
        state = {_open_clip_key(k): v for k, v in state.items()}
    matched = [k for k in state if k in own]
    if not matched:
        raise ValueError(
            f"{source} has none of the keys of open_clip model {model_name!r} "
            f"(e.g. file has {list(state)[:3]}, model expects {list(own)[:3]}): wrong model name or wrong file? "
            "(EVA-CLIP / CLIPSelf and ovseg CLIPSelfDistiller layouts are converted automatically.)"
        )
    bad_shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in matched if state[k].shape != own[k].shape]
    if bad_shapes:
        raise ValueError(
            f"{source} does not fit {model_name!r}; shape mismatches: {bad_shapes[:5]}"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        logger.warning("Weights file %s lacks %d keys of %s (left random): %s", path, len(missing), model_name,
                       missing[:10])
    if unexpected:
        logger.warning("Weights file %s has %d keys unknown to %s (ignored): %s", path, len(unexpected),
                       model_name, unexpected[:10])
    logger.info("Loaded %d/%d tensors of %s from %s", len(matched), len(own), model_name, path)


def load_open_clip(model_name: str, pretrained: str, trust_pickled_weights: bool = False,
                   what: str = "MODEL.CLIP.PRETRAINED") -> nn.Module:
    """Build the open_clip model `model_name` with weights `pretrained`.

    Args:
        model_name: an open_clip architecture (``open_clip.list_models()``), including ovseg's tiny ones.
        pretrained: an open_clip pretrained tag (downloaded to the open_clip/HF cache on first use), a local
            checkpoint file, a name from ovseg's model zoo (`ovseg.model_zoo`: downloaded, verified and cached on
            first use), or "" for random initialisation.
        trust_pickled_weights: let a local file that needs full unpickling (objects beyond tensors, TorchScript)
            load; such a file can run code (MODEL.CLIP.TRUST_PICKLED_WEIGHTS). Safetensors and plain state dicts
            load either way.
        what: how errors name `pretrained`: the config key, or the flag of a script (e.g. "--input").
    Returns:
        the open_clip model (CLIP or CustomTextCLIP), fp32, on CPU, in eval mode.
    """
    if model_name in TINY_MODELS:  # asked for by name: make them known to open_clip now
        register_tiny_models()
    _check_model_name(model_name)
    # imported here: `python -m ovseg.model_zoo` must not find the module already imported by the package
    from ..model_zoo import resolve_weights, unknown_weights_error

    pretrained = resolve_weights(pretrained, "MODEL.CLIP.PRETRAINED", model_name)  # a zoo name -> its cached file
    if not pretrained:
        logger.warning("MODEL.CLIP.PRETRAINED is empty: %s is randomly initialised (smoke tests only)", model_name)
        model = open_clip.create_model(model_name, pretrained=None)
    elif _is_path(pretrained):
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(
                f"{_named(what, pretrained)}: no such file. Give the path of a CLIP checkpoint for "
                f"{model_name}, or an open_clip tag ({open_clip.list_pretrained_tags_by_model(model_name)})."
            )
        model = open_clip.create_model(model_name, pretrained=None)
        _load_file(model, pretrained, model_name, trust_pickled_weights, what)
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise unknown_weights_error("MODEL.CLIP.PRETRAINED", pretrained,
                                        f" nor an open_clip tag of {model_name} ({tags})")
        try:
            with _hub_cache_only_when_unreachable():
                model = open_clip.create_model(model_name, pretrained=pretrained)
        except Exception as e:  # noqa: BLE001 - network / hub failures come in many types
            raise WeightsUnavailableError(
                f"Could not get the {model_name!r} weights {pretrained!r} ({type(e).__name__}: {e}). Without "
                "internet, download them elsewhere and set MODEL.CLIP.PRETRAINED to the local file "
                "(train_net.py: MODEL.CLIP.PRETRAINED /path/to/weights.bin as a trailing option; demo: --opts "
                "MODEL.CLIP.PRETRAINED /path/to/weights.bin, or --random-init for a smoke run; Python: "
                "Predictor(..., opts=['MODEL.CLIP.PRETRAINED', '/path/to/weights.bin']), '' for random weights)."
            ) from e
    return model.float().eval()


def split_clip(model: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """Split an open_clip model into (visual tower, text model without the visual tower).

    The text side keeps `encode_text` working (CLIP and CustomTextCLIP alike) while the visual tower's
    parameters live in one place only.
    """
    visual = model.visual
    model.visual = None
    return visual, model


def load_open_clip_from_cfg(cfg) -> nn.Module:
    """`load_open_clip` with MODEL.CLIP.MODEL_NAME / PRETRAINED / TRUST_PICKLED_WEIGHTS: what every model builds."""
    return load_open_clip(cfg.MODEL.CLIP.MODEL_NAME, cfg.MODEL.CLIP.PRETRAINED, cfg.MODEL.CLIP.TRUST_PICKLED_WEIGHTS)


def load_clip_towers(cfg) -> Tuple[nn.Module, nn.Module]:
    """The CLIP of MODEL.CLIP.*, loaded once and split into (visual tower, text model): what the dense encoder and
    the text classifier of every ovseg model are built from."""
    return split_clip(load_open_clip_from_cfg(cfg))
