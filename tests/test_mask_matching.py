"""Hungarian matcher against brute force; set criterion against a hand computation."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from ovseg.modeling.criterion import SetCriterion
from ovseg.modeling.matcher import HungarianMatcher


def _brute_cost(logits, masks, labels, tgt, wc, wm, wd):
    q, n = len(logits), len(labels)
    cost = torch.zeros(q, n)
    for i in range(q):
        p = logits[i].softmax(-1)
        for j in range(n):
            bce = F.binary_cross_entropy_with_logits(masks[i], tgt[j].float())
            s = masks[i].sigmoid()
            dice = 1 - (2 * (s * tgt[j]).sum() + 1) / (s.sum() + tgt[j].sum() + 1)
            cost[i, j] = -wc * p[labels[j]] + wm * bce + wd * dice
    return cost


def _case(seed, q, n, k=4, size=8):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(q, k + 1, generator=g) * 2
    masks = torch.randn(q, size, size, generator=g) * 3
    labels = torch.randint(0, k, (n,), generator=g)
    tgt = torch.rand(n, size, size, generator=g) > 0.5
    return logits, masks, labels, tgt


@pytest.mark.parametrize("seed,q,n", [(0, 5, 3), (1, 4, 4), (2, 3, 5), (3, 6, 1), (4, 5, 2)])
def test_matcher_is_optimal_against_brute_force(seed, q, n):
    logits, masks, labels, tgt = _case(seed, q, n)
    matcher = HungarianMatcher(class_weight=2.0, mask_weight=5.0, dice_weight=5.0, num_points=0)
    (rows, cols), = matcher({"pred_logits": logits[None], "pred_masks": masks[None]},
                            [{"labels": labels, "masks": tgt}])
    cost = _brute_cost(logits, masks, labels, tgt, 2.0, 5.0, 5.0)
    assert len(rows) == len(cols) == min(q, n)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    got = cost[rows, cols].sum()
    if n <= q:  # every target gets a distinct query
        best = min(sum(cost[perm[j], j] for j in range(n)) for perm in itertools.permutations(range(q), n))
    else:  # every query gets a distinct target
        best = min(sum(cost[i, perm[i]] for i in range(q)) for perm in itertools.permutations(range(n), q))
    torch.testing.assert_close(got, torch.as_tensor(best), rtol=1e-5, atol=1e-5)


def test_matcher_handles_images_without_targets():
    logits, masks, _, _ = _case(0, 4, 1)
    out = HungarianMatcher(num_points=16)({"pred_logits": logits[None], "pred_masks": masks[None]},
                                          [{"labels": torch.zeros(0, dtype=torch.long),
                                            "masks": torch.zeros(0, 8, 8, dtype=torch.bool)}])
    assert len(out[0][0]) == 0


def test_criterion_equals_hand_computation():
    logits, masks, labels, tgt = _case(5, 5, 3)
    matcher = HungarianMatcher(class_weight=2.0, mask_weight=5.0, dice_weight=5.0, num_points=0)
    crit = SetCriterion(matcher=matcher, class_weight=2.0, mask_weight=5.0, dice_weight=5.0, no_object_weight=0.1,
                        num_points=0, deep_supervision=True)
    outputs = {"pred_logits": logits[None], "pred_masks": masks[None],
               "aux_outputs": [{"pred_logits": logits[None] * 0.5, "pred_masks": masks[None]}]}
    losses = crit(outputs, [{"labels": labels, "masks": tgt}])
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"}

    (rows, cols), = matcher({"pred_logits": logits[None], "pred_masks": masks[None]},
                            [{"labels": labels, "masks": tgt}])
    target = torch.full((5,), 4)  # void = K
    target[rows] = labels[cols]
    weight = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.1])
    nll = -logits.log_softmax(-1)[torch.arange(5), target]
    ce = (weight[target] * nll).sum() / weight[target].sum()
    bce = sum(F.binary_cross_entropy_with_logits(masks[r], tgt[c].float()) for r, c in zip(rows, cols)) / 3
    dice = 0.0
    for r, c in zip(rows, cols):
        s = masks[r].sigmoid()
        dice += 1 - (2 * (s * tgt[c]).sum() + 1) / (s.sum() + tgt[c].sum() + 1)
    torch.testing.assert_close(losses["loss_ce"], 2.0 * ce)
    torch.testing.assert_close(losses["loss_mask"], 5.0 * bce)
    torch.testing.assert_close(losses["loss_dice"], 5.0 * dice / 3)


def test_point_sampled_losses_prefer_correct_masks():
    # importance sampling concentrates points on uncertain (boundary) locations, where even a perfect mask's
    # bilinear value is ambiguous, so compare with wrong masks rather than expect zero
    torch.manual_seed(0)
    logits, masks, labels, _ = _case(6, 3, 3, size=32)
    tgt = torch.zeros(3, 32, 32, dtype=torch.bool)  # blobs, not salt-and-pepper: few boundary pixels
    tgt[0, 2:20, 3:15] = tgt[1, 18:30, 10:31] = tgt[2, :10, 16:] = True
    perfect = (tgt.float() * 2 - 1) * 20
    crit = SetCriterion(matcher=HungarianMatcher(num_points=64), num_points=64, deep_supervision=False)
    good = crit({"pred_logits": logits[None], "pred_masks": perfect[None]}, [{"labels": labels, "masks": tgt}])
    bad = crit({"pred_logits": logits[None], "pred_masks": -perfect[None]}, [{"labels": labels, "masks": tgt}])
    assert good["loss_mask"] < 0.5 * bad["loss_mask"] and good["loss_dice"] < 0.5 * bad["loss_dice"]
    masks.requires_grad_(True)
    losses = crit({"pred_logits": logits[None], "pred_masks": masks[None]}, [{"labels": labels, "masks": tgt}])
    sum(losses.values()).backward()
    assert masks.grad.abs().sum() > 0


def _mask2former_matching(logits, masks, targets, num_points, wc=2.0, wm=5.0, wd=5.0):
    """Mask2Former's `memory_efficient_forward`, written out: per image, the points are drawn first, whether or
    not the image has targets."""
    from detectron2.projects.point_rend.point_features import point_sample
    from scipy.optimize import linear_sum_assignment

    out = []
    for b, tgt in enumerate(targets):
        prob = logits[b].softmax(-1)
        points = torch.rand(1, num_points, 2)
        t = point_sample(tgt["masks"][:, None].float(), points.repeat(len(tgt["masks"]), 1, 1),
                         align_corners=False)[:, 0]
        p = point_sample(masks[b][:, None], points.repeat(len(masks[b]), 1, 1), align_corners=False)[:, 0]
        bce = torch.stack([torch.stack([F.binary_cross_entropy_with_logits(p[i], t[j]) for j in range(len(t))])
                           if len(t) else torch.zeros(0) for i in range(len(p))])
        s = p.sigmoid()
        dice = 1 - (2 * s @ t.t() + 1) / (s.sum(-1)[:, None] + t.sum(-1)[None, :] + 1)
        cost = wm * bce + wc * -prob[:, tgt["labels"]] + wd * dice
        rows, cols = linear_sum_assignment(cost.reshape(len(p), -1).numpy())
        out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return out


def test_matcher_random_points_follow_mask2former_order():
    """An image without targets still draws its points, so the next image matches on Mask2Former's points."""
    cases = [_case(s, 6, n) for s, n in ((10, 3), (11, 0), (12, 4), (13, 2))]
    logits = torch.stack([c[0] for c in cases])
    masks = torch.stack([c[1] for c in cases])
    targets = [{"labels": c[2], "masks": c[3]} for c in cases]
    torch.manual_seed(0)
    ours = HungarianMatcher(num_points=5)({"pred_logits": logits, "pred_masks": masks}, targets)
    after_ours = torch.rand(3)
    torch.manual_seed(0)
    ref = _mask2former_matching(logits, masks, targets, num_points=5)
    after_ref = torch.rand(3)
    for (r, c), (rr, rc) in zip(ours, ref):
        assert torch.equal(r, rr) and torch.equal(c, rc)
    assert torch.equal(after_ours, after_ref)  # the same amount of the random stream was used
