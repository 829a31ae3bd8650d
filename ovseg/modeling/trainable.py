"""Which parameters of a frozen pretrained tower train: unlocking by parameter-name pattern."""
from __future__ import annotations

import re
from typing import List, Sequence, Tuple

import torch
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


def _keep_rows(rows: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        # the mask is made on the CPU with the model; the gradient comes on the parameters' device (CUDA)
        return grad * rows.to(device=grad.device, dtype=grad.dtype)
    return hook


def unlock_query_value(module: nn.Module) -> Tuple[List[str], List[str]]:
    """Make the attention query and value projection weights of every attention layer in `module` trainable
    (CAT-Seg's fine-tuning of CLIP: q / v weights; keys, biases and everything else stay frozen).

    Separate q / v projections (timm's EVA `attn.q_proj` / `attn.v_proj`) are simply unlocked. Packed ones
    (`nn.MultiheadAttention.in_proj_weight`, timm's fused `attn.qkv.weight`, rows q, k, v) are unlocked whole with
    a gradient hook that zeroes the key rows: the key rows then get no gradient, and with no weight decay on the
    packed tensor (the caller's job: the second list) an optimizer leaves them exactly as they are.

    Returns:
        (names unlocked, names of the packed tensors among them), as `module.named_parameters()` spells them.
    """
    unlocked, packed = [], []
    for mname, m in module.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(m, nn.MultiheadAttention):
            if not m._qkv_same_embed_dim:  # noqa: SLF001  (public constructor state: separate q/k/v weights)
                raise NotImplementedError(f"{mname}: attention with separate q/k/v weights of unequal dims")
            w, name = m.in_proj_weight, prefix + "in_proj_weight"
        elif hasattr(m, "q_proj") and hasattr(m, "v_proj") and isinstance(m.q_proj, nn.Linear):
            for proj in (m.q_proj, m.v_proj):
                proj.weight.requires_grad_(True)
            unlocked += [prefix + "q_proj.weight", prefix + "v_proj.weight"]
            continue
        elif isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "num_heads"):
            w, name = m.qkv.weight, prefix + "qkv.weight"
        else:
            continue
        dim = w.shape[0] // 3
        rows = torch.ones(w.shape[0], 1)
        rows[dim:2 * dim] = 0  # the key rows
        w.requires_grad_(True)
        w.register_hook(_keep_rows(rows))
        unlocked.append(name)
        packed.append(name)
    if not unlocked:
        raise ValueError(f"{type(module).__name__} has no attention layer whose q / v projections could be unlocked")
    return unlocked, packed
