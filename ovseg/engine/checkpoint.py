"""Checkpoints that are safe to load and hard to lose.

- Loading: every file goes through `ovseg.utils.safe_load.load_weights_file` (safetensors, or
  `torch.load(weights_only=True)`: tensors and plain containers only), so a hostile file cannot run code. Pickles
  (`.pkl`, detectron2 / Caffe2 model-zoo files) and any file that needs arbitrary Python objects are refused unless
  the user sets MODEL.TRUST_PICKLED_WEIGHTS, saying they trust the file.
- Saving: written to a temporary file in the same folder, then renamed over the target (atomic on POSIX), so a kill
  during a save never leaves a truncated `model_XXXX.pth`; `last_checkpoint` is replaced the same way.
- Resuming: the file named by `last_checkpoint` is checked (a complete zip archive, CRCs included); if it is damaged
  the newest intact checkpoint of the folder is used instead, with a warning.
- Foreign layouts: a CAT-Seg release (the authors' keys) is converted for a CATSegSegmentor on load
  (`ovseg.modeling.checkpoint_layouts.to_model_layout`; any key left over or missing is an error).
- Evaluating (`strict=True`): weights whose shapes do not fit the model, or trainable parameters the file lacks, are
  errors instead of detectron2's "Skip loading parameter" warnings.
"""
import logging
import os
import tempfile
import zipfile
from typing import Any, Dict

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..modeling.checkpoint_layouts import to_model_layout
from ..utils.safe_load import load_weights_file
from .errors import UserError

__all__ = ["SafeCheckpointer", "is_intact_checkpoint"]

logger = logging.getLogger(__name__)
TRUST_KEY = "MODEL.TRUST_PICKLED_WEIGHTS"


def is_intact_checkpoint(path: str) -> bool:
    """True when `path` is a complete `torch.save` archive (zip with valid CRCs); False for 0-byte / truncated files."""
    try:
        if os.path.getsize(path) == 0 or not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def _atomic_write(path: str, write) -> None:
    """Call write(file object) on a temporary file next to `path`, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class SafeCheckpointer(DetectionCheckpointer):
    """detectron2's `DetectionCheckpointer` with safe loading, atomic saving, verified resuming and (optionally)
    strict loading; see the module docstring."""

    def __init__(self, model, save_dir: str = "", *, trust_pickle: bool = False, strict: bool = False,
                 **checkpointables):
        """
        Args:
            trust_pickle: allow files that need arbitrary Python objects (they can run code when loaded).
            strict: error on shape mismatches and on trainable parameters missing from the file (evaluation).
        """
        super().__init__(model, save_dir, **checkpointables)
        self.trust_pickle = trust_pickle
        self.strict = strict

    # ---- loading -------------------------------------------------------------------------------------------------
    def _refuse(self, filename: str, why: str) -> UserError:
        return UserError(
            f"refusing to load {filename}: {why}. Unpickling can run arbitrary code; if you trust this file, "
            f"set {TRUST_KEY} True (e.g. append `{TRUST_KEY} True` to the command line)")

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if not os.path.exists(filename):
            raise UserError(f"weights file not found: {filename}")
        if os.path.getsize(filename) == 0:
            raise UserError(f"weights file {filename} is empty (0 bytes): an interrupted save or download?")
        if filename.endswith((".pkl", ".pyth")) and not self.trust_pickle:
            raise self._refuse(filename, "it is a pickle file")
        return super()._load_file(filename)

    def _torch_load(self, filename: str) -> Dict[str, Any]:
        try:
            return load_weights_file(filename, trust_pickled=self.trust_pickle, what=f"weights file {filename}",
                                     trust_hint=f"set {TRUST_KEY} True (append `{TRUST_KEY} True` to the command line)")
        except ValueError as e:  # UntrustedWeightsError included: one line for the user, not a traceback
            raise UserError(str(e)) from None

    def _load_model(self, checkpoint: Any):
        try:  # foreign whole-model layouts (CAT-Seg's releases) -> ours, every key accounted for
            checkpoint["model"], layout = to_model_layout(checkpoint["model"], self.model)
        except ValueError as e:
            raise UserError(str(e)) from None
        if layout:
            self.logger.info("Converted the %s checkpoint's keys to %s", layout, type(self.model).__name__)
        incompatible = super()._load_model(checkpoint)
        if self.strict:
            problems = [f"{k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in incompatible.incorrect_shapes]
            trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
            problems += [f"{k}: missing from the file" for k in incompatible.missing_keys if k in trainable]
            if problems:
                shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
                raise UserError(f"the weights do not fit the model: {shown}. Check MODEL.WEIGHTS against the config; "
                                "MODEL.ALLOW_RANDOM_WEIGHTS True evaluates with random parameters on purpose")
        return incompatible

    # ---- saving --------------------------------------------------------------------------------------------------
    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        _atomic_write(path, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        tag = last_filename_basename.encode()
        _atomic_write(os.path.join(self.save_dir, "last_checkpoint"), lambda f: f.write(tag))

    # ---- resuming ------------------------------------------------------------------------------------------------
    def get_checkpoint_file(self) -> str:
        named = super().get_checkpoint_file()
        if named and is_intact_checkpoint(named):
            return named
        intact = sorted((f for f in self.get_all_checkpoint_files() if is_intact_checkpoint(f)),
                        key=lambda f: (os.path.getmtime(f), f), reverse=True)
        if not intact:
            raise UserError(f"--resume: {named or 'last_checkpoint'} is damaged and {self.save_dir} holds no intact "
                            "checkpoint; start without --resume")
        logger.warning("last_checkpoint names %s, which is damaged (truncated or empty); resuming from the newest "
                       "intact checkpoint %s instead", named, intact[0])
        return intact[0]
