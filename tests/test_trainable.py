"""unlock_query_value (CAT-Seg's q / v fine-tuning): the key-row gradient mask on any device, and no trainable
parameter left without a gradient."""
import torch
from torch import nn

from ovseg.modeling.tiny_models import TINY_EVA
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


def test_catseg_on_eva_every_trainable_parameter_gets_a_gradient():
    # DDP (find_unused_parameters off, as the trainer builds it) fails on a trainable parameter that no forward
    # uses; CAT-Seg's last visual block reads only its value path, so a separate query projection there must stay
    # frozen (EVA's q_proj; a packed in_proj_weight is used through its value rows)
    from detectron2.modeling import build_model

    from ovseg.modeling.text import parse_vocabulary
    from tests.test_catseg import tiny_catseg_cfg

    model = build_model(tiny_catseg_cfg(MODEL__CLIP__MODEL_NAME=TINY_EVA))
    model._train_vocabulary = parse_vocabulary("cat,dog,sky")
    model.train()
    batch = [{"image": torch.randint(0, 255, (3, 64, 64)).float(), "sem_seg": torch.randint(0, 3, (64, 64))}]
    model(batch)["loss_sem_seg"].backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused
