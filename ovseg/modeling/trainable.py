"""Which parameters of a frozen pretrained tower train: unlocking by parameter-name pattern."""
from __future__ import annotations

import re
from typing import List, Sequence

from torch import nn


def unlock_by_patterns(module: nn.Module, patterns: Sequence[str], key: str = "MODEL.CLIP.UNLOCK_PATTERNS"
                       ) -> List[str]:
    """Make trainable every parameter of `module` whose name (as `module.named_parameters()` gives it) one of the
    regular expressions `patterns` finds (`re.search`); others are left as they are.

    A pattern that does not compile, or that names no parameter, is an error (a typo would otherwise train
    nothing). Returns the names unlocked.
    """
    names = [n for n, _ in module.named_parameters()]
    unlocked = set()
    for pattern in patterns:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{key}: {pattern!r} is not a regular expression ({e})") from None
        hits = [n for n in names if rx.search(n)]
        if not hits:
            raise ValueError(f"{key}: {pattern!r} matches no parameter; names look like {names[:4]} ... "
                             f"{names[-2:]}")
        unlocked.update(hits)
    for n, p in module.named_parameters():
        if n in unlocked:
            p.requires_grad_(True)
    return [n for n in names if n in unlocked]
