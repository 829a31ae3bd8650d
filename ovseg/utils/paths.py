"""Files shipped inside the ovseg package (configs, class lists), named the same in a checkout and after install."""
import difflib
import os
from pathlib import Path
from typing import Dict, List, Union

PACKAGE_DIR = Path(__file__).resolve().parents[1]
# "ovseg://data/class_lists/x.txt" names a file inside the installed package, whatever the working directory
PACKAGE_PREFIX = "ovseg://"


def resolve_package_path(path: str) -> str:
    """A path as given, or for the `ovseg://` form the file inside the package (`ovseg://data/class_lists/a.txt`
    -> `<site-packages>/ovseg/data/class_lists/a.txt`). Whether the file exists is the caller's check."""
    if path.startswith(PACKAGE_PREFIX):
        return os.fspath(PACKAGE_DIR / path[len(PACKAGE_PREFIX):])
    return path


def config_roots() -> List[Path]:
    """Folders holding the shipped configs: the package's `ovseg/configs` (package data; the checkout's `configs/`
    is a link to it)."""
    return [p for p in (PACKAGE_DIR / "configs",) if p.is_dir()]


def shipped_configs() -> Dict[str, List[Path]]:
    """Every shipped config by its path relative to its root without `.yaml` (e.g. `trainingfree/naclip_vitb16`);
    a relative path found under two roots keeps the first root's file."""
    found: Dict[str, List[Path]] = {}
    for root in config_roots():
        for path in sorted(root.rglob("*.yaml")):
            rel = path.relative_to(root).with_suffix("").as_posix()
            found.setdefault(rel, []).append(path)
    return found


def resolve_config(name: Union[str, os.PathLike]) -> Path:
    """A yaml path as given, or a shipped config by name: its file name without `.yaml` (`naclip_vitb16`) or
    the trailing part of its relative path (`naclip/ade20k`, `trainingfree/naclip/ade20k`)."""
    text = os.fspath(name)
    if os.path.isfile(text):
        return Path(text)
    key = text[:-5] if text.endswith(".yaml") else text
    key = key.strip("/")
    configs = shipped_configs()
    matches = [paths[0] for rel, paths in configs.items() if rel == key or rel.endswith("/" + key)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"config name {text!r} is ambiguous: {sorted(str(m) for m in matches)}; name it by its "
                         "folder too, e.g. 'naclip/ade20k'")
    names = sorted({rel.rsplit("/", 1)[-1] for rel in configs})
    close = difflib.get_close_matches(key, names, n=5, cutoff=0.5)
    roots = ", ".join(str(r) for r in config_roots()) or "none found"
    raise FileNotFoundError(f"no config file or shipped config named {text!r} (searched {roots})"
                            + (f"; close names: {close}" if close else f"; shipped: {names}"))
