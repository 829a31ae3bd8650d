"""Low-precision copies of weights under autocast, cast once instead of on every forward (issue #12).

Autocast keeps its casts only for weights that take gradients, and only within one autocast region: the frozen
CLIP tower (and any weight read without autograd) is otherwise cast to bf16 / fp16 again by every op on every
image, a copy kernel per weight. The copies here are kept on the module that owns the weight and made again when
the weight changes: a new storage (`load_state_dict` into a new tensor, `.to(device)`), an in-place write (its
`_version` counter: `load_state_dict`'s `copy_`, optimizer steps, edits under `no_grad`) or another dtype.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, List, Sequence, Tuple

import torch
from torch import nn

# modules whose weights autocast runs in the low precision (matmuls, convolutions); norms run in float32 and keep
# theirs as they are
LOW_PRECISION_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)


def cast_cached(owner: nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` (a weight of `owner` called `name`) in `dtype`, from a copy kept on `owner` while the weight is
    unchanged (same storage, device, dtype and version counter). The copy is detached: callers use it only where
    no gradient must reach the weight (frozen weights, or no autograd at all)."""
    store = owner.__dict__.setdefault("_ovseg_low_precision", {})
    key = (dtype, tensor.device, tensor.dtype, tensor.data_ptr(), tensor._version)
    hit = store.get(name)
    if hit is None or hit[0] != key:
        hit = store[name] = (key, nn.Parameter(tensor.detach().to(dtype), requires_grad=False))
    return hit[1]


def _frozen_float_weights(module: nn.Module, extra: Iterable[Tuple[nn.Module, str]]
                          ) -> Iterator[Tuple[nn.Module, str, torch.Tensor]]:
    pairs = [(m, n) for m in module.modules() if isinstance(m, LOW_PRECISION_MODULES) for n in m._parameters]
    grad = torch.is_grad_enabled()
    for mod, name in [*pairs, *extra]:
        p = mod._parameters.get(name)
        # with autograd, trainable weights keep autocast's own cast (in the graph, so that gradients reach them);
        # without it (inference) they are cast once like the frozen ones (autocast would cast them every region)
        if p is not None and not (p.requires_grad and grad) and p.dtype == torch.float32:
            yield mod, name, p


@contextmanager
def frozen_weights_in_autocast_dtype(module: nn.Module, device_type: str,
                                     extra: Sequence[Tuple[nn.Module, str]] = ()):
    """Within the block, under autocast to bf16 / fp16 on `device_type`, the frozen float32 weights (all of them
    without autograd) of `module`'s matmul and convolution layers (and the `extra` (module, parameter name) pairs,
    e.g. a projection matrix used with `@`) are their cached low-precision copies (`cast_cached`), so autocast
    finds them already cast. Outside autocast it does nothing. Re-entrant: an inner block finds the weights
    already swapped and leaves them."""
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    dtype = torch.get_autocast_dtype(device_type)
    swapped: List[Tuple[nn.Module, str, torch.Tensor]] = []
    try:
        for mod, name, p in list(_frozen_float_weights(module, extra)):
            mod._parameters[name] = cast_cached(mod, name, p, dtype)
            swapped.append((mod, name, p))
        yield
    finally:
        for mod, name, p in swapped:
            mod._parameters[name] = p
