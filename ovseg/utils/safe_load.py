"""Reading weights files as data, never as code.

A `.pth` / `.pt` / `.bin` file is a pickle, and unpickling can run any Python the file names (a `__reduce__` that
calls `os.system`). Every weights file ovseg reads goes through `load_weights_file`: safetensors as they are,
torch files with ``torch.load(weights_only=True)`` (tensors, numbers, strings, containers only). A file that needs
more (arbitrary classes, a TorchScript archive) is refused with `UntrustedWeightsError` unless the caller passes
``trust_pickled=True``, which the user sets by a key or flag whose name says so.
"""
from __future__ import annotations

import pickle
import zipfile
from typing import Any

import torch

__all__ = ["UntrustedWeightsError", "load_weights_file"]


class UntrustedWeightsError(ValueError):
    """A weights file holds Python objects beyond tensors; loading it could run code, and the user did not opt in."""


def _is_torchscript(path: str) -> bool:
    # torch.jit.save archives hold `<name>/constants.pkl` next to their code; torch.save archives do not
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


def _looks_pickled(path: str) -> bool:
    """torch.save files: a zip archive, or (legacy format) a pickle, whose protocol >= 2 opcode is 0x80."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _unsafe_globals(path: str) -> str:
    try:  # public since torch 2.5; zip checkpoints only
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - legacy pickles and older torch: no list, the message stays general
        return ""
    return f" (it names {', '.join(names[:5])})" if names else ""


def load_weights_file(path: str, *, trust_pickled: bool = False, what: str = "weights file",
                      trust_hint: str = "pass trust_pickled=True") -> Any:
    """Load a weights file without running code from it.

    Args:
        path: a `.safetensors` file or a `torch.save` / `torch.jit.save` file.
        trust_pickled: allow full unpickling (and TorchScript archives) for files that need it. Only for files
            from a source the user trusts: such a file can run any code.
        what: how error messages name the file, e.g. "MODEL.CLIP.PRETRAINED='x.pt'".
        trust_hint: how the user opts in, e.g. "set MODEL.CLIP.TRUST_PICKLED_WEIGHTS True".
    Returns:
        what the file holds: a dict of tensors for safetensors; for torch files the saved object (for a
        TorchScript archive its `state_dict()`).
    Raises:
        UntrustedWeightsError: the file needs full unpickling and `trust_pickled` is False.
        ValueError: not a readable weights file.
    """
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{what} is not a readable safetensors file: {e}") from e
    if _is_torchscript(path):
        if not trust_pickled:
            raise UntrustedWeightsError(
                f"{what} is a TorchScript archive (e.g. OpenAI's original CLIP files), which holds code. If you trust "
                f"its source, {trust_hint}; or use the open_clip tag (e.g. 'openai') or a safetensors file instead."
            )
        return torch.jit.load(path, map_location="cpu").state_dict()
    if not _looks_pickled(path):
        raise ValueError(f"{what} is not a readable torch checkpoint (neither a torch.save file nor safetensors)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickled:
            raise UntrustedWeightsError(
                f"{what} holds Python objects beyond tensors{_unsafe_globals(path)}: unpickling it could run code "
                f"from the file, so it was not loaded. If you trust its source, {trust_hint}; better, save its "
                "tensors once as a plain state dict or safetensors."
            ) from e
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        raise ValueError(f"{what} is not a readable torch checkpoint: {type(e).__name__}: {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - e.g. a plain pickle that is not in torch's format
        raise ValueError(f"{what} is not a readable torch checkpoint: {type(e).__name__}: {e}") from e
