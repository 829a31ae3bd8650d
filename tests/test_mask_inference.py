"""Post-processing (semantic / panoptic / instance), the geometric ensemble and mask-pooled classification."""
import math

import pytest
import torch
import torch.nn.functional as F

from ovseg.modeling.classifiers import InVocabClassifier, geometric_ensemble, out_of_vocab_logits
from ovseg.modeling.postprocessing import OutputMasks, instance_inference, panoptic_inference, semantic_inference


def _random(seed, q=12, k=5, h=20, w=24):
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(q, k + 1, generator=g) * 3).softmax(-1)
    masks = (torch.randn(q, 1, h // 4, w // 4, generator=g) * 4)
    masks = F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)[:, 0].sigmoid()
    return probs, masks


def test_semantic_inference_is_probability_weighted_mask_sum():
    probs, masks = _random(0)
    out = semantic_inference(probs, masks)
    ref = torch.zeros(5, 20, 24)
    for q in range(len(probs)):
        for c in range(5):
            ref[c] += probs[q, c] * masks[q]
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("seed", range(6))
def test_panoptic_segments_are_disjoint_and_consistent(seed):
    probs, masks = _random(seed)
    is_thing = torch.tensor([True, True, False, False, True])
    pan, segments = panoptic_inference(probs, masks, is_thing, object_mask_threshold=0.3, overlap_threshold=0.5)
    assert pan.shape == (20, 24) and pan.dtype == torch.int32
    ids = [s["id"] for s in segments]
    assert ids == list(range(1, len(segments) + 1))
    assert set(pan.unique().tolist()) <= {0, *ids}  # one segment per pixel by construction of a label map
    stuff_classes = [s["category_id"] for s in segments if not s["isthing"]]
    assert len(stuff_classes) == len(set(stuff_classes)), "stuff of one class must be one segment"
    for s in segments:
        assert s["area"] == int((pan == s["id"]).sum()) > 0
        assert 0 <= s["category_id"] < 5 and s["isthing"] == bool(is_thing[s["category_id"]])
        assert s["score"] > 0.3


def _panoptic_loop(probs, masks, is_thing, object_mask_threshold, overlap_threshold):
    """Mask2Former's panoptic rule written out pixel by pixel, one kept query at a time."""
    scores, labels = probs[:, :-1].max(-1)
    kept = [q for q in range(len(probs)) if scores[q] > object_mask_threshold and probs[q].argmax() < len(probs[q]) - 1]
    pan = torch.zeros(masks.shape[-2:], dtype=torch.int32)
    segments, stuff = [], {}
    if not kept:
        return pan, segments
    owner = torch.stack([scores[q] * masks[q] for q in kept]).argmax(0)
    for i, q in enumerate(kept):
        region = (owner == i) & (masks[q] >= 0.5)
        own_area, area = int((masks[q] >= 0.5).sum()), int(region.sum())
        if own_area == 0 or area == 0 or area / own_area < overlap_threshold:
            continue
        cls = int(labels[q])
        if not is_thing[cls] and cls in stuff:
            seg = segments[stuff[cls] - 1]
            seg["area"] += area
            seg["score"] = max(seg["score"], float(scores[q]))
            pan[region] = seg["id"]
            continue
        segments.append({"id": len(segments) + 1, "category_id": cls, "isthing": bool(is_thing[cls]),
                         "score": float(scores[q]), "area": area})
        pan[region] = len(segments)
        if not is_thing[cls]:
            stuff[cls] = len(segments)
    return pan, segments


@pytest.mark.parametrize("seed", range(8))
def test_panoptic_equals_pixel_loop(seed):
    probs, masks = _random(seed, q=16, h=24, w=28)
    is_thing = torch.tensor([True, False, True, False, False])
    found = 0
    for thresholds in ((0.3, 0.5), (0.0, 0.0), (0.5, 0.8)):
        pan, segments = panoptic_inference(probs, masks, is_thing, *thresholds)
        ref_pan, ref_segments = _panoptic_loop(probs, masks, is_thing, *thresholds)
        assert torch.equal(pan, ref_pan) and segments == ref_segments
        found += len(ref_segments)
    assert found > 0


def test_panoptic_ties_go_to_the_earlier_query_across_chunks():
    # 20 queries (several chunks), equal scores, saturated masks: every pixel ties between all of them
    probs = torch.zeros(20, 3)
    probs[:, 0] = 0.9
    probs[:, 2] = 0.1
    masks = torch.ones(20, 6, 7)
    masks[:3, :, :3] = 0.0  # the first three queries leave the left columns to the fourth
    pan, segments = panoptic_inference(probs, masks, torch.tensor([True, True]), 0.5, 0.0)
    ref_pan, ref_segments = _panoptic_loop(probs, masks, torch.tensor([True, True]), 0.5, 0.0)
    assert torch.equal(pan, ref_pan) and segments == ref_segments
    assert [s["area"] for s in segments] == [6 * 4, 6 * 3]  # query 0 (right), query 3 (left)


def test_output_masks_are_fp32_after_autocast():
    logits = torch.randn(5, 6, 8).bfloat16()
    masks = OutputMasks(logits, (24, 32), (22, 30), (11, 15))
    assert masks[[0, 3]].dtype == torch.float32 and masks[[0, 3]].shape == (2, 11, 15)
    torch.testing.assert_close(masks[[0, 3]], OutputMasks(logits.float(), (24, 32), (22, 30), (11, 15))[[0, 3]])


def test_panoptic_hand_built_case():
    # query 0: thing class 0 on the left half; query 1: stuff class 1 on the right; query 2: void; query 3:
    # low-confidence; query 4: thing 0 whose mask mostly lies under query 0 (fails the overlap test)
    h, w = 8, 8
    masks = torch.zeros(5, h, w)
    masks[0, :, :4] = 0.9
    masks[1, :, 4:] = 0.9
    masks[2] = 0.99
    masks[3, :4] = 0.95
    masks[4, :, 2:5] = 0.6
    probs = torch.tensor([[0.95, 0.02, 0.03], [0.02, 0.95, 0.03], [0.05, 0.05, 0.9], [0.5, 0.3, 0.2],
                          [0.9, 0.05, 0.05]])
    pan, segments = panoptic_inference(probs, masks, torch.tensor([True, False]), 0.8, 0.8)
    assert [(s["category_id"], s["isthing"]) for s in segments] == [(0, True), (1, False)]
    assert (pan[:, :4] == 1).all() and (pan[:, 4:] == 2).all()


# (30, 40): more pairs than queries, so some query yields two classes; and several chunks of queries
@pytest.mark.parametrize("queries,top_k", [(12, 7), (30, 40)])
def test_instance_inference_topk_over_things(queries, top_k):
    probs, masks = _random(3, q=queries)
    is_thing = torch.tensor([True, False, True, False, False])
    inst = instance_inference(probs, masks, is_thing, top_k=top_k)
    assert len(inst) == top_k
    assert set(inst.pred_classes.tolist()) <= {0, 2}
    assert inst.pred_masks.dtype == torch.bool and inst.pred_masks.shape == (top_k, 20, 24)
    # score = class prob x mean mask prob inside the binary mask, for the best (query, class) pairs
    flat = (probs[:, :-1] * is_thing).flatten()
    best = flat.topk(top_k).indices
    for i, idx in enumerate(best.tolist()):
        q, c = divmod(idx, 5)
        m = masks[q] >= 0.5
        ref = probs[q, c] * (masks[q][m].mean() if m.any() else 0)
        assert int(inst.pred_classes[i]) == c
        torch.testing.assert_close(inst.scores[i], torch.as_tensor(float(ref)))
        assert torch.equal(inst.pred_masks[i], m)
        if m.any():
            ys, xs = torch.nonzero(m, as_tuple=True)
            torch.testing.assert_close(inst.pred_boxes.tensor[i], torch.tensor(
                [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32))


def test_geometric_ensemble_formula():
    g = torch.Generator().manual_seed(0)
    in_logits = torch.randn(2, 3, 5, generator=g) * 3  # 4 classes + void
    out_logits = torch.randn(2, 3, 4, generator=g) * 3
    seen = torch.tensor([True, False, True, False])
    alpha, beta = 0.4, 0.8
    out = geometric_ensemble(in_logits, out_logits, seen, alpha, beta)
    for b in range(2):
        for q in range(3):
            p_in = [math.exp(v) for v in in_logits[b, q].tolist()]
            p_in = [v / sum(p_in) for v in p_in]
            p_out = [math.exp(v) for v in out_logits[b, q].tolist()]
            p_out = [v / sum(p_out) for v in p_out]
            e = [p_in[c] ** (1 - (alpha if seen[c] else beta)) * p_out[c] ** (alpha if seen[c] else beta)
                 for c in range(4)]
            ref = [v / sum(e) * (1 - p_in[4]) for v in e] + [p_in[4]]
            torch.testing.assert_close(out[b, q], torch.tensor(ref), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3))
    # weight 0 = the in-vocabulary classifier alone (renormalised over the non-void classes)
    only_in = geometric_ensemble(in_logits, out_logits, seen, 0.0, 0.0)
    torch.testing.assert_close(only_in, in_logits.softmax(-1), rtol=1e-5, atol=1e-6)


def test_out_of_vocab_logits_are_mask_averages_of_clip_features():
    g = torch.Generator().manual_seed(1)
    dense = F.normalize(torch.randn(2, 8, 3, 4, generator=g), dim=1)
    masks = torch.rand(2, 5, 3, 4, generator=g)
    masks[1, 2] = 0  # empty mask: zero feature, zero logits
    text = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    out = out_of_vocab_logits(dense, masks, text, scale=50.0)
    for b in range(2):
        for q in range(5):
            acc, wsum = torch.zeros(8), 0.0
            for y in range(3):
                for x in range(4):
                    acc += masks[b, q, y, x] * dense[b, :, y, x]
                    wsum += float(masks[b, q, y, x])
            feat = acc / wsum if wsum else acc
            feat = feat / feat.norm() if feat.norm() > 0 else feat
            torch.testing.assert_close(out[b, q], 50.0 * text @ feat, rtol=1e-5, atol=1e-5)


def test_in_vocab_classifier_is_scaled_cosine_with_void_last():
    clf = InVocabClassifier(8, logit_scale=10.0, learn_logit_scale=False)
    embeds = torch.randn(1, 3, 8)
    text = F.normalize(torch.randn(4, 8), dim=-1)
    out = clf(embeds, text)
    void = F.normalize(clf.void_embedding[0], dim=0)
    ref = 10.0 * F.normalize(embeds, dim=-1) @ torch.cat([text, void[None]]).t()
    torch.testing.assert_close(out, ref)
    assert not any(p is clf.log_scale for p in clf.parameters())
