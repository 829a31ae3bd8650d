"""Weights by name: ovseg's model-zoo table (`ovseg/model_zoo.json`) and the cache it downloads into.

    MODEL.CLIP.PRETRAINED eva02_clip_b16        # any config key or argument that takes weights takes a name
    python -m ovseg.model_zoo list              # the table
    python -m ovseg.model_zoo download clipself_eva02_b16_coco_patches --allow-unverified

A name resolves to `$OVSEG_CACHE/<name>/<filename>` (default `~/.cache/ovseg`): used as it is when present, else
downloaded with a progress bar, resumed when interrupted, verified against the table's sha256 (or, where none is
published, the server's own LFS sha256) and only then given its final name. Offline, the error names the URL, the
sha256 and the path to put the file at.

Table fields (one entry per file): name; what (one line); url (https, pinned to a commit where the host has them);
filename (in the cache); sha256 (null: none published); size (bytes, or null); sha256_source (where the digest was
read); licence (the weights' own); key (the config key it is for: MODEL.CLIP.PRETRAINED = a CLIP, MODEL.WEIGHTS =
a whole model); model_name (open_clip architecture it fits); configs (shipped configs it fits); layout (its key
layout: open_clip, eva-clip / cat-seg (converted on load), ovseg); needs (why it cannot be loaded yet, if so).
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .utils.download import Download, WeightsUnavailableError, cached_or_download

__all__ = ["ZooEntry", "cache_dir", "is_zoo_name", "licence_of", "licences_of_cfg", "markdown_table", "resolve_weights",
           "zoo", "zoo_entry", "zoo_path"]

TABLE_PATH = Path(__file__).resolve().with_name("model_zoo.json")
KEYS = ("MODEL.CLIP.PRETRAINED", "MODEL.WEIGHTS")
# layouts the loaders read (eva-clip, ovseg's distiller and cat-seg are converted on load by checkpoint_layouts.py)
LOADABLE_LAYOUTS = ("open_clip", "eva-clip", "ovseg", "cat-seg")


@dataclass(frozen=True)
class ZooEntry:
    name: str
    what: str
    url: str
    filename: str
    sha256: Optional[str]
    size: Optional[int]
    sha256_source: str
    licence: str
    key: str
    model_name: str
    layout: str
    configs: Tuple[str, ...] = ()
    needs: str = ""

    def __post_init__(self):
        if self.key not in KEYS:
            raise ValueError(f"model zoo entry {self.name!r}: key {self.key!r} is not one of {KEYS}")
        if not self.url.startswith(("https://", "http://", "file://")):
            raise ValueError(f"model zoo entry {self.name!r}: url {self.url!r} is not an http(s):// or file:// URL")
        if self.sha256 is not None and (len(self.sha256) != 64 or self.sha256.strip("0123456789abcdef")):
            raise ValueError(f"model zoo entry {self.name!r}: sha256 {self.sha256!r} is not 64 lower-case hex digits")
        if self.layout not in LOADABLE_LAYOUTS and not self.needs:
            raise ValueError(f"model zoo entry {self.name!r}: layout {self.layout!r} has no loader; say what it "
                             "needs in 'needs'")


def load_table(path: os.PathLike) -> Dict[str, ZooEntry]:
    """A zoo table file -> {name: entry}; unknown or missing fields are errors."""
    with open(path) as f:
        raw = json.load(f)
    entries: Dict[str, ZooEntry] = {}
    for item in raw["entries"]:
        item = dict(item, configs=tuple(item.get("configs", ())))
        try:
            e = ZooEntry(**item)
        except TypeError as err:
            raise ValueError(f"{path}: entry {item.get('name')!r}: {err}") from err
        if e.name in entries:
            raise ValueError(f"{path}: model zoo name {e.name!r} appears twice")
        entries[e.name] = e
    return entries


_zoo: Optional[Dict[str, ZooEntry]] = None


def zoo() -> Dict[str, ZooEntry]:
    """The package's table, read once."""
    global _zoo
    if _zoo is None:
        _zoo = load_table(TABLE_PATH)
    return _zoo


def cache_dir() -> Path:
    """`$OVSEG_CACHE`, default `~/.cache/ovseg`."""
    return Path(os.environ.get("OVSEG_CACHE") or Path("~/.cache/ovseg").expanduser())


def zoo_path(e: ZooEntry) -> Path:
    """Where the entry's file lives in the cache (and where to put it by hand when offline)."""
    return cache_dir() / e.name / e.filename


def is_zoo_name(spec: str) -> bool:
    return spec in zoo()


def zoo_entry(name: str) -> ZooEntry:
    """The entry called `name`; an unknown name is one error listing the known ones."""
    table = zoo()
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=3)
        raise ValueError(f"{name!r} is not in ovseg's model zoo" + (f" (did you mean {close}?)" if close else "")
                       + f"; known names: {', '.join(table)} (python -m ovseg.model_zoo list)")
    return table[name]


def fetch(name: str, *, allow_unverified: bool = False, progress: bool = True) -> str:
    """The local path of zoo entry `name`: from the cache, else downloaded and verified (see module docstring)."""
    e = zoo_entry(name)
    return cached_or_download(Download(url=e.url, path=os.fspath(zoo_path(e)), sha256=e.sha256, name=e.name,
                                       licence=e.licence), allow_unverified=allow_unverified, progress=progress)


def unknown_weights_error(key: str, spec: str, also: str = "") -> ValueError:
    """One error for a weights spec that is neither a file nor a name: it lists the zoo's names for `key`."""
    names = [n for n, e in zoo().items() if key not in KEYS or e.key == key]
    return ValueError(f"{key}={spec!r} is neither a file{also} nor a model-zoo name; names for {key}: "
                      f"{', '.join(names) or 'none'} (python -m ovseg.model_zoo list)")


def resolve_weights(spec: str, key: str, model_name: Optional[str] = None) -> str:
    """`spec` as a local file path when it names a zoo entry (downloaded / cached); anything else unchanged.

    Args:
        spec: a config value (MODEL.CLIP.PRETRAINED or MODEL.WEIGHTS): a file, a URL, a tag, or a zoo name.
        key: which config key it came from; a zoo entry made for the other key is an error.
        model_name: MODEL.CLIP.MODEL_NAME; a CLIP entry for another architecture is an error.
    """
    if not spec or os.path.exists(spec) or not is_zoo_name(spec):
        return spec
    e = zoo_entry(spec)
    if e.key != key:
        raise ValueError(f"{key}={spec!r}: that model-zoo entry is for {e.key} ({e.what})")
    if e.needs:
        raise ValueError(f"{key}={spec!r} ({e.what}, {e.layout} layout) cannot be loaded yet: it needs {e.needs}. "
                         f"`python -m ovseg.model_zoo download {spec}` fetches the file")
    if model_name and e.key == "MODEL.CLIP.PRETRAINED" and e.model_name != model_name:
        raise ValueError(f"{key}={spec!r} is {e.model_name} weights but MODEL.CLIP.MODEL_NAME is {model_name!r}")
    return fetch(spec)


def licence_of(spec: str) -> Optional[str]:
    """The licence of the weights `spec` names: a zoo name, or a file in the zoo's cache; None when unknown."""
    if is_zoo_name(spec):
        return zoo_entry(spec).licence
    path = Path(spec).resolve() if spec else None
    for e in zoo().values():
        if path is not None and zoo_path(e).resolve() == path:
            return e.licence
    return None


def licences_of_cfg(cfg) -> Dict[str, str]:
    """{config key: licence} of the model-zoo weights a config names (MODEL.CLIP.PRETRAINED, MODEL.WEIGHTS): what
    an exported model should carry next to it. Weights not from the zoo are left out (their licence is unknown)."""
    found = {key: licence_of(value) for key, value in (("MODEL.CLIP.PRETRAINED", cfg.MODEL.CLIP.PRETRAINED),
                                                       ("MODEL.WEIGHTS", cfg.MODEL.WEIGHTS))}
    return {key: lic for key, lic in found.items() if lic}


def _checksum_cell(e: ZooEntry) -> str:
    return f"`{e.sha256[:12]}…`" if e.sha256 else "none published: the server's LFS sha256, else `--allow-unverified`"


def markdown_table(entries: Optional[Sequence[ZooEntry]] = None) -> str:
    """The zoo as a markdown table (what `list` prints and the README shows)."""
    rows = ["| name | what | for | fits configs | layout | sha256 | licence |", "|---|---|---|---|---|---|---|"]
    for e in entries if entries is not None else zoo().values():
        target = f"`{e.key}` ({e.model_name})"
        configs = ", ".join(f"`{c}`" for c in e.configs) or "-"
        layout = e.layout + (f" (needs {e.needs})" if e.needs else
                             ", converted on load" if e.layout in ("eva-clip", "cat-seg") else "")
        rows.append(f"| `{e.name}` | [{e.what}]({e.url}) | {target} | {configs} | {layout} | {_checksum_cell(e)} "
                    f"| {e.licence} |")
    return "\n".join(rows)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ovseg.model_zoo", description="ovseg's model zoo")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="print the table")
    dl = sub.add_parser("download", help="download (or find in the cache) and verify, print the path")
    dl.add_argument("names", nargs="+")
    dl.add_argument("--allow-unverified", action="store_true",
                    help="accept a file no sha256 is published for (its digest is printed and recorded)")
    sub.add_parser("where", help="print the cache folder ($OVSEG_CACHE, default ~/.cache/ovseg)")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        print(markdown_table())
    elif args.cmd == "where":
        print(cache_dir())
    else:
        try:
            for name in args.names:
                print(fetch(name, allow_unverified=args.allow_unverified))
        except (ValueError, WeightsUnavailableError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
