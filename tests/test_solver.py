"""The engine's optimizers (SOLVER.OPTIMIZER) and the poly LR schedule (SOLVER.LR_SCHEDULER_NAME "WarmupPolyLR"),
each against its rule written out here."""
import pytest
import torch
from torch import nn

from ovseg.config import get_ovseg_cfg
from ovseg.engine import Trainer


class Toy(nn.Module):
    """A backbone matrix, a head with a bias, a norm layer and an embedding: one parameter of each kind."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 2)
        self.norm = nn.LayerNorm(2)
        self.embed = nn.Embedding(3, 2)


def _cfg(**overrides):
    cfg = get_ovseg_cfg()
    cfg.merge_from_list([x for k, v in overrides.items() for x in (k.replace("__", "."), v)])
    return cfg


def _lr_of(optimizer, param):
    return next(g["lr"] for g in optimizer.param_groups if any(p is param for p in g["params"]))


def _poly_factor(it, max_iter, power, warmup_iters, warmup_factor, constant_ending):
    """Mask2Former's WarmupPolyLR, written out: linear warm-up from warmup_factor to 1 over warmup_iters, times
    (1 - it / max_iter) ^ power; after warm-up, a factor below constant_ending (if > 0) becomes constant_ending."""
    warm = warmup_factor + (1 - warmup_factor) * it / warmup_iters if it < warmup_iters else 1.0
    poly = (1 - it / max_iter) ** power
    if constant_ending > 0 and warm == 1.0 and poly < constant_ending:
        return constant_ending
    return warm * poly


@pytest.mark.parametrize("power,warmup_iters,constant_ending", [(0.9, 0, 0.0), (0.9, 10, 0.0), (1.5, 5, 0.2)])
def test_poly_lr_at_each_iteration_equals_the_formula(power, warmup_iters, constant_ending):
    max_iter = 60
    cfg = _cfg(SOLVER__OPTIMIZER="SGD", SOLVER__BASE_LR=0.1, SOLVER__BACKBONE_MULTIPLIER=0.1,
               SOLVER__LR_SCHEDULER_NAME="WarmupPolyLR", SOLVER__POLY_LR_POWER=power,
               SOLVER__POLY_LR_CONSTANT_ENDING=constant_ending, SOLVER__MAX_ITER=max_iter,
               SOLVER__WARMUP_ITERS=warmup_iters, SOLVER__WARMUP_FACTOR=0.01, SOLVER__WARMUP_METHOD="linear")
    model = Toy()
    optimizer = Trainer.build_optimizer(cfg, model)
    scheduler = Trainer.build_lr_scheduler(cfg, optimizer)
    seen_ending = False
    for it in range(max_iter):  # the LR the optimizer steps with at iteration `it` (detectron2 steps after each)
        factor = _poly_factor(it, max_iter, power, warmup_iters, 0.01, constant_ending)
        seen_ending |= constant_ending > 0 and factor == constant_ending
        assert _lr_of(optimizer, model.head.weight) == pytest.approx(0.1 * factor, rel=1e-9, abs=1e-15), it
        assert _lr_of(optimizer, model.backbone.weight) == pytest.approx(0.01 * factor, rel=1e-9, abs=1e-15), it
        optimizer.step()
        scheduler.step()
    assert seen_ending == (constant_ending > 0)  # the constant ending was reached where it is on


def test_sgd_steps_with_the_configs_momentum_nesterov_and_weight_decay_per_group():
    cfg = _cfg(SOLVER__OPTIMIZER="SGD", SOLVER__MOMENTUM=0.8, SOLVER__NESTEROV=True, SOLVER__BASE_LR=0.5,
               SOLVER__BACKBONE_MULTIPLIER=0.2, SOLVER__WEIGHT_DECAY=0.05, SOLVER__WEIGHT_DECAY_NORM=0.01,
               SOLVER__WEIGHT_DECAY_EMBED=0.02, SOLVER__WEIGHT_DECAY_RULE="ndim")
    torch.manual_seed(0)
    model = Toy()
    optimizer = Trainer.build_optimizer(cfg, model)
    assert type(optimizer) is torch.optim.SGD
    # the engine's "ndim" rule, written out: matrices WEIGHT_DECAY, vectors WEIGHT_DECAY_NORM, embeddings _EMBED
    expected = {"backbone.weight": (0.1, 0.05), "head.weight": (0.5, 0.05), "head.bias": (0.5, 0.01),
                "norm.weight": (0.5, 0.01), "norm.bias": (0.5, 0.01), "embed.weight": (0.5, 0.02)}
    params = dict(model.named_parameters())
    for name, (lr, wd) in expected.items():
        group = next(g for g in optimizer.param_groups if any(p is params[name] for p in g["params"]))
        assert (group["lr"], group["weight_decay"], group["momentum"], group["nesterov"]) == \
            (pytest.approx(lr), wd, 0.8, True), name

    # two steps against SGD's update written out: d = g + wd p; buf = m buf + d (buf = d at first);
    # nesterov: p -= lr (d + m buf)
    start = {n: p.detach().clone() for n, p in params.items()}
    grads = [{n: torch.randn_like(p) for n, p in params.items()} for _ in range(2)]
    ref, buf = dict(start), {}
    for step_grads in grads:
        for n, p in params.items():
            p.grad = step_grads[n].clone()
        optimizer.step()
        for n, (lr, wd) in expected.items():
            d = step_grads[n] + wd * ref[n]
            buf[n] = d if n not in buf else 0.8 * buf[n] + d
            ref[n] = ref[n] - lr * (d + 0.8 * buf[n])
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_adamw_stays_the_default_and_unknown_optimizers_fail_clearly():
    cfg = _cfg(SOLVER__ADAMW_BETAS=[0.8, 0.9], SOLVER__ADAMW_EPS=1e-6)
    optimizer = Trainer.build_optimizer(cfg, Toy())
    assert type(optimizer) is torch.optim.AdamW
    assert {(g["betas"], g["eps"]) for g in optimizer.param_groups} == {((0.8, 0.9), 1e-6)}
    # SGD under the whole-model gradient clipping keeps its momentum
    cfg = _cfg(SOLVER__OPTIMIZER="SGD", SOLVER__MOMENTUM=0.7, SOLVER__CLIP_GRADIENTS__ENABLED=True,
               SOLVER__CLIP_GRADIENTS__CLIP_TYPE="full_model", SOLVER__CLIP_GRADIENTS__CLIP_VALUE=1.0)
    optimizer = Trainer.build_optimizer(cfg, Toy())
    assert isinstance(optimizer, torch.optim.SGD) and {g["momentum"] for g in optimizer.param_groups} == {0.7}
    cfg.SOLVER.OPTIMIZER = "LAMB"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER='LAMB'"):
        Trainer.build_optimizer(cfg, Toy())
