"""Shared plumbing of the `datasets/prepare_*.py` scripts: arguments, input checks, atomic writes, parallel jobs."""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
from typing import Callable, Iterable, List, Optional, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from .datasets import default_root, files_under


class PrepareError(RuntimeError):
    """A missing or malformed input; the message says which file and what was expected."""


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None,
                        help="datasets root (default: $DETECTRON2_DATASETS, else ./datasets)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="parallel processes over images (1 = in this process)")
    return parser


def resolve_root(root: Optional[str]) -> str:
    return default_root() if root is None else os.path.expanduser(root)


def require(path: str, what: str, hint: str = "") -> str:
    """Return `path`, or raise PrepareError naming it when it does not exist."""
    if not os.path.exists(path):
        raise PrepareError(f"missing {what}: {path}" + (f"\n  {hint}" if hint else ""))
    return path


def list_files(folder: str, ext: str, what: str, hint: str = "", recursive: bool = False) -> List[str]:
    """Sorted names of the `*ext` files in `folder` (with `recursive`, their paths relative to it, sub-folders
    included); PrepareError when the folder is missing or has none."""
    require(folder, what, hint)
    if recursive:
        names = files_under(folder, ext)
    else:
        names = sorted(f for f in os.listdir(folder) if f.endswith(ext) and not f.startswith("."))
    if not names:
        where = os.path.join(folder, "**") if recursive else folder
        raise PrepareError(f"no *{ext} files in {where} ({what})" + (f"\n  {hint}" if hint else ""))
    return names


def _temp_name(path: str) -> str:
    # same folder (os.replace stays atomic) and a suffix no loader matches (`*.png`, `*.tif`, `*.json`)
    return f"{path}.{os.getpid()}.part"


def save_image_atomic(array: np.ndarray, path: str, fmt: str = "PNG") -> None:
    """Write an image via a temporary name and rename, so `path` is either absent or complete."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _temp_name(path)
    try:
        Image.fromarray(array).save(tmp, format=fmt)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def copy_file_atomic(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = _temp_name(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_json_atomic(obj, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _temp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_image(path: str, what: str, channels: Optional[int] = None, modes: Sequence[str] = ()) -> np.ndarray:
    """Read a label image as an array, checking PIL mode / channel count; PrepareError names the file otherwise."""
    try:
        with Image.open(path) as img:
            if modes and img.mode not in modes:
                raise PrepareError(f"malformed {what} {path}: PIL mode {img.mode!r}, expected one of {list(modes)}")
            array = np.array(img)
    except PrepareError:
        raise
    except Exception as e:  # truncated / not an image
        raise PrepareError(f"malformed {what} {path}: cannot be read as an image ({e})") from e
    if channels is not None:
        got = 1 if array.ndim == 2 else array.shape[2]
        if got != channels:
            raise PrepareError(f"malformed {what} {path}: {got} channel(s), expected {channels}")
    return array


def check_values(array: np.ndarray, allowed_max: int, path: str, what: str, extra: Iterable[int] = ()) -> None:
    """PrepareError when `array` holds a value above `allowed_max` other than those in `extra`."""
    bad = array > allowed_max
    for v in extra:
        bad &= array != v
    if bad.any():
        raise PrepareError(f"malformed {what} {path}: value {int(array[bad].max())} outside 0..{allowed_max}")


def run_jobs(fn: Callable, jobs: Sequence, workers: int, desc: str) -> list:
    """`[fn(job) for job in jobs]` with a tqdm bar, over `workers` processes when > 1 (results in job order)."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(job) for job in tqdm(jobs, desc=desc, unit="img")]
    chunksize = max(1, min(64, len(jobs) // (workers * 8)))
    with mp.Pool(workers) as pool:
        return list(tqdm(pool.imap(fn, jobs, chunksize=chunksize), total=len(jobs), desc=desc, unit="img"))


def run_cli(main: Callable[[Optional[Sequence[str]]], object]) -> None:
    """Run a script's `main`, turning PrepareError into a one-line message and exit status 1."""
    try:
        main(None)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
