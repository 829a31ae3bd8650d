"""2-D sine positional encodings for flattened feature maps (pixel decoder and transformer decoder)."""
from __future__ import annotations

import math

import torch


def sine_position_encoding(height: int, width: int, dim: int, device=None, dtype=torch.float32,
                           temperature: float = 10000.0) -> torch.Tensor:
    """Fixed encoding of normalised (y, x) positions, half of the channels each.

    Positions are normalised to (0, 2*pi] so the encoding means "where in the image", not "which cell", and
    stays comparable across input sizes.

    Returns:
        (dim, height, width); channels [0, dim/2) encode y, [dim/2, dim) encode x, alternating sin / cos.
    """
    if dim % 4:
        raise ValueError(f"sine position encoding needs a channel count divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = temperature ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)  # (dim/4,)
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 1) / height * 2 * math.pi
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 1) / width * 2 * math.pi

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos[:, None] / freqs[None]  # (n, dim/4)
        return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)  # (n, dim/2)

    ey = encode(ys).t()[:, :, None].expand(-1, height, width)  # (dim/2, H, W)
    ex = encode(xs).t()[:, None, :].expand(-1, height, width)
    return torch.cat([ey, ex], dim=0).to(dtype)
