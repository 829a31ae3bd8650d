"""Files shipped inside the ovseg package (configs, class lists), named the same in a checkout and after install."""
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
# "ovseg://data/class_lists/x.txt" names a file inside the installed package, whatever the working directory
PACKAGE_PREFIX = "ovseg://"


def resolve_package_path(path: str) -> str:
    """A path as given, or for the `ovseg://` form the file inside the package (`ovseg://data/class_lists/a.txt`
    -> `<site-packages>/ovseg/data/class_lists/a.txt`). Whether the file exists is the caller's check."""
    if path.startswith(PACKAGE_PREFIX):
        return os.fspath(PACKAGE_DIR / path[len(PACKAGE_PREFIX):])
    return path
