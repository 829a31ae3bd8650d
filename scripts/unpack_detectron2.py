#!/usr/bin/env python
"""Offline detectron2 fallback: unpack the Python sources of a detectron2 wheel into site-packages.

The wheel is built for another CPython, so its compiled extension (``detectron2/_C*.so``) is left out and
replaced by a placeholder module that raises ImportError with an explanation. detectron2 already guards
every use of ``_C`` (deformable conv, fast COCO eval, rotated-box ops) with a pure-Python fallback or a
dummy that fails only when called; ovseg uses none of them.

Usage: unpack_detectron2.py WHEEL SITE_PACKAGES
"""
import re
import sys
import zipfile
from pathlib import Path

PLACEHOLDER = '''"""Placeholder for detectron2's compiled ops (installed by ovseg's offline fallback).

This detectron2 was unpacked from a prebuilt wheel for another Python version, without its C++/CUDA
extension. Deformable convolution, rotated-box ops and the fast COCO evaluator are unavailable; the rest
of detectron2 works. Build the official package for those ops:
    pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'
"""
raise ImportError(
    "detectron2._C is not available: detectron2 was installed by ovseg's offline fallback without compiled "
    "ops. Install the official build for deformable conv / rotated boxes / fast COCO eval."
)
'''


def main(wheel: str, site: str) -> None:
    site_dir = Path(site)
    version = "0.0"
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.endswith(".dist-info/METADATA"):
                found = re.search(r"^Version: (\S+)", zf.read(name).decode(), re.M)
                version = found.group(1) if found else version
            if not name.startswith("detectron2/") or name.endswith("/"):
                continue
            if re.match(r"detectron2/_C\..*\.(so|pyd)$", name):
                continue
            target = site_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
    (site_dir / "detectron2" / "_C.py").write_text(PLACEHOLDER)
    # Minimal metadata so `pip show detectron2` / `pip uninstall detectron2` know about it.
    files = [p.relative_to(site_dir).as_posix() for p in (site_dir / "detectron2").rglob("*") if p.is_file()]
    dist = site_dir / f"detectron2-{version}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: detectron2\nVersion: {version}\n"
        "Summary: detectron2 Python sources without compiled ops (ovseg offline fallback)\n"
    )
    (dist / "INSTALLER").write_text("ovseg-install\n")
    record = files + [f"{dist.name}/{f}" for f in ("METADATA", "INSTALLER", "RECORD")]
    (dist / "RECORD").write_text("".join(f"{f},,\n" for f in record))
    print(f"unpacked detectron2 {version} ({len(files)} files) into {site_dir}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
