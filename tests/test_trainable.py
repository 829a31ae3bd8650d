"""unlock_query_value: the key-row gradient mask follows the parameters to any device."""
import torch
from torch import nn

from ovseg.modeling.trainable import unlock_query_value


def test_key_rows_mask_follows_the_gradient_device():
    # the mask is built on the CPU at model construction; the trainer then moves the parameters to CUDA in place
    # (the hook stays on them) and the gradient arrives there. The 'meta' device stands in for CUDA: a CPU tensor
    # times a tensor on another device raises on both.
    attn = nn.MultiheadAttention(8, 2)
    for p in attn.parameters():
        p.requires_grad_(False)
    unlock_query_value(attn)
    hooks = list(attn.in_proj_weight._backward_hooks.values())
    assert len(hooks) == 1
    out = hooks[0](torch.ones(24, 8, device="meta"))
    assert out.device.type == "meta" and out.shape == (24, 8)
    # the same rule on the CPU: key rows (q, k, v order) zeroed
    ref = torch.ones(24, 8)
    ref[8:16] = 0
    assert torch.equal(hooks[0](torch.ones(24, 8)), ref)


def test_key_rows_get_no_gradient():
    attn = nn.MultiheadAttention(8, 2)
    for p in attn.parameters():
        p.requires_grad_(False)
    unlock_query_value(attn)
    x = torch.randn(3, 1, 8)
    y = torch.randn(5, 1, 8)
    attn(x, y, y)[0].square().sum().backward()
    g = attn.in_proj_weight.grad
    assert torch.all(g[8:16] == 0)  # key rows (q, k, v order)
    assert g[:8].abs().sum() > 0 and g[16:].abs().sum() > 0
