"""Post-processing (semantic / panoptic / instance), the geometric ensemble and mask-pooled classification,
each against a plain written-out implementation of FC-CLIP's rule (bytedance/fc-clip@2b0bbe2,
`fcclip/fcclip.py`: full (Q, H, W) stacks, one query at a time, no chunking) on many random cases."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import BitMasks

from ovseg.modeling.classifiers import ClassText, InVocabClassifier, geometric_ensemble, out_of_vocab_logits
from ovseg.modeling.meta_arch.mask_segmentor import OpenVocabMaskSegmentor
from ovseg.modeling.postprocessing import (
    OutputMasks,
    instance_inference,
    mask_boxes,
    panoptic_inference,
    semantic_inference,
)

THRESHOLDS = [(0.0, 0.8), (0.8, 0.8), (0.3, 0.5), (0.0, 0.0)]


def _random(seed, q=12, k=5, h=20, w=24):
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(q, k + 1, generator=g) * 3).softmax(-1)
    masks = (torch.randn(q, 1, h // 4, w // 4, generator=g) * 4)
    masks = F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)[:, 0].sigmoid()
    return probs, masks


def _random_case(seed, q=12, k=6):
    """Class probabilities with some confident queries, low-resolution mask logits on a padded image and
    their `OutputMasks`, and the same masks written out at output resolution (logits)."""
    g = torch.Generator().manual_seed(seed)
    sharp = torch.rand(q, 1, generator=g) * 6
    probs = (torch.randn(q, k + 1, generator=g) * sharp).softmax(-1)
    logits = torch.randn(q, 5, 6, generator=g) * 4
    logits[torch.rand(q, generator=g) < 0.15] = -5.0  # some empty masks
    padded, image, output = (20, 24), (18, 21), (27, 31)
    masks = OutputMasks(logits, padded, image, output)
    full = sem_seg_postprocess(F.interpolate(logits[None], size=padded, mode="bilinear", align_corners=False)[0],
                               image, *output)
    is_thing = torch.rand(k, generator=g) < 0.5
    return probs, masks, full, is_thing


def _quantised_case(seed, q=12, k=4, h=9, w=11):
    """Masks and scores from a few values, so that the pixel argmax ties often (ties: the earlier query)."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    masks = levels[torch.randint(0, 5, (q, h, w), generator=g)]
    probs = torch.full((q, k + 1), 0.02)
    cls = torch.randint(0, k + 1, (q,), generator=g)
    probs[torch.arange(q), cls] = torch.tensor([0.9, 0.6])[torch.randint(0, 2, (q,), generator=g)]
    probs = probs / probs.sum(-1, keepdim=True)
    return probs, masks, torch.rand(k, generator=g) < 0.5


def fcclip_panoptic(probs, masks, is_thing, object_mask_threshold, overlap_threshold):
    """FC-CLIP's `panoptic_inference` written out: probs (Q, K + 1), masks (Q, H, W) probabilities."""
    num_classes = probs.shape[1] - 1
    scores, labels = probs.max(-1)
    keep = (labels != num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], masks[keep]
    pan = torch.zeros(masks.shape[-2:], dtype=torch.int32)
    segments = []
    if len(cur_masks) == 0:
        return pan, segments
    ids = (cur_scores[:, None, None] * cur_masks).argmax(0)
    stuff = {}
    for k in range(len(cur_classes)):
        c = int(cur_classes[k])
        won = int((ids == k).sum())
        own = int((cur_masks[k] >= 0.5).sum())
        region = (ids == k) & (cur_masks[k] >= 0.5)
        if won > 0 and own > 0 and int(region.sum()) > 0:
            if won / own < overlap_threshold:
                continue
            if not is_thing[c]:
                if c in stuff:
                    pan[region] = stuff[c]
                    continue
                stuff[c] = len(segments) + 1
            segments.append({"id": len(segments) + 1, "isthing": bool(is_thing[c]), "category_id": c})
            pan[region] = len(segments)
    return pan, segments


def fcclip_instances(probs, mask_logits, is_thing, top_k):
    """FC-CLIP's `instance_inference` (panoptic datasets: top-k over all pairs, then things), with boxes from
    detectron2's `BitMasks`. Returns (class, score, mask, box) tuples by decreasing score."""
    q, num_classes = probs.shape[0], probs.shape[1] - 1
    scores = probs[:, :-1]
    labels = torch.arange(num_classes).unsqueeze(0).repeat(q, 1).flatten()
    top, idx = scores.flatten().topk(min(top_k, q * num_classes), sorted=False)
    out = []
    for s, i in zip(top.tolist(), idx.tolist()):
        c, query = int(labels[i]), i // num_classes
        if not is_thing[c]:
            continue
        binary = (mask_logits[query] > 0).float()
        mask_score = (mask_logits[query].sigmoid() * binary).sum() / (binary.sum() + 1e-6)
        box = BitMasks(binary[None].bool()).get_bounding_boxes().tensor[0]
        out.append((c, s * float(mask_score), binary.bool(), box))
    return sorted(out, key=lambda t: (-t[1], t[0]))  # equal scores: 0, from empty masks


def _check_panoptic(pan, segments, ref_pan, ref_segments):
    assert torch.equal(pan, ref_pan)
    assert [{k: s[k] for k in ("id", "isthing", "category_id")} for s in segments] == ref_segments
    for s in segments:
        assert s["area"] == int((pan == s["id"]).sum())


@pytest.mark.parametrize("thresholds", THRESHOLDS)
def test_panoptic_equals_fcclip_on_random_cases(thresholds):
    compared = 0
    for seed in range(40):
        probs, masks, full, is_thing = _random_case(seed)
        ref = fcclip_panoptic(probs, full.sigmoid(), is_thing, *thresholds)
        _check_panoptic(*panoptic_inference(probs, masks, is_thing, *thresholds), *ref)
        _check_panoptic(*panoptic_inference(probs, full.sigmoid(), is_thing, *thresholds), *ref)
        compared += len(ref[1])
    assert compared > 10


@pytest.mark.parametrize("thresholds", THRESHOLDS)
def test_panoptic_equals_fcclip_with_ties_and_stuff_merging(thresholds):
    merged = 0
    for seed in range(40):
        probs, masks, is_thing = _quantised_case(seed)
        ref_pan, ref_segments = fcclip_panoptic(probs, masks, is_thing, *thresholds)
        _check_panoptic(*panoptic_inference(probs, masks, is_thing, *thresholds), ref_pan, ref_segments)
        kept = (probs.max(-1).values > thresholds[0]) & (probs.argmax(-1) < probs.shape[1] - 1)
        stuff = [int(c) for c in probs[kept, :-1].argmax(-1) if not is_thing[c]]
        merged += len(stuff) - len(set(stuff))
    assert merged > 0  # the cases did merge stuff queries


def test_panoptic_counts_won_pixels_outside_the_own_mask():
    # query 1 wins 4 pixels (columns 4-7) but only 1 of them lies in its own mask (>= 0.5), whose area is 4
    # (columns 0-2 lost to query 0, and 4): won / own = 4 / 4 >= 0.8, so it is a segment of 1 pixel (counting
    # only the claimed pixels, 1 / 4, dropped it)
    masks = torch.zeros(2, 1, 8)
    masks[0, 0, :4] = 0.9
    masks[1, 0] = torch.tensor([0.6, 0.6, 0.6, 0.0, 0.6, 0.4, 0.4, 0.4])
    probs = torch.tensor([[0.95, 0.0, 0.05], [0.0, 0.95, 0.05]])
    pan, segments = panoptic_inference(probs, masks, torch.tensor([True, True]), 0.8, 0.8)
    ref = fcclip_panoptic(probs, masks, torch.tensor([True, True]), 0.8, 0.8)
    _check_panoptic(pan, segments, *ref)
    assert [s["area"] for s in segments] == [4, 1]


def test_panoptic_ties_go_to_the_earlier_query_across_chunks():
    # 20 queries (several chunks), equal scores, saturated masks: every pixel ties between all of them
    probs = torch.zeros(20, 3)
    probs[:, 0] = 0.9
    probs[:, 2] = 0.1
    masks = torch.ones(20, 6, 7)
    masks[:3, :, :3] = 0.0  # the first three queries leave the left columns to the fourth
    pan, segments = panoptic_inference(probs, masks, torch.tensor([True, True]), 0.5, 0.0)
    _check_panoptic(pan, segments, *fcclip_panoptic(probs, masks, torch.tensor([True, True]), 0.5, 0.0))
    assert [s["area"] for s in segments] == [6 * 4, 6 * 3]  # query 0 (right), query 3 (left)


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


@pytest.mark.parametrize("top_k", [5, 17, 100])
def test_instance_inference_equals_fcclip_on_random_cases(top_k):
    fewer = 0
    for seed in range(30):
        probs, masks, full, is_thing = _random_case(seed)
        ref = fcclip_instances(probs, full, is_thing, top_k)
        inst = instance_inference(probs, masks, is_thing, top_k)
        assert len(inst) == len(ref)
        fewer += len(ref) < min(top_k, probs[:, :-1].numel())
        order = sorted(range(len(inst)), key=lambda i: (-float(inst.scores[i]), int(inst.pred_classes[i])))
        for i, (c, score, mask, box) in zip(order, ref):
            assert int(inst.pred_classes[i]) == c
            torch.testing.assert_close(float(inst.scores[i]), score, rtol=1e-5, atol=1e-7)
            assert torch.equal(inst.pred_masks[i], mask)
            assert torch.equal(inst.pred_boxes.tensor[i], box)
    assert fewer > 0  # non-thing pairs in the top-k were dropped, not replaced


def test_mask_boxes_equal_detectron2_and_stay_on_the_masks_device():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(30, 13, 17, generator=g) > 0.97  # sparse: many boxes, some empty
    masks[0] = False
    masks[1, 12, 16] = True
    torch.testing.assert_close(mask_boxes(masks).tensor, BitMasks(masks).get_bounding_boxes().tensor,
                               rtol=0, atol=0)
    assert mask_boxes(masks[:0]).tensor.shape == (0, 4)
    # torch ops only: on the "meta" device (no data) the boxes stay there; detectron2's are built on the CPU
    assert mask_boxes(torch.zeros(3, 5, 6, dtype=torch.bool, device="meta")).tensor.device.type == "meta"


def _devices(out):
    inst = out["instances"]
    pan, _ = out["panoptic_seg"]
    return {out["sem_seg"].device, pan.device, *(v.device if torch.is_tensor(v) else v.tensor.device
                                                 for v in inst.get_fields().values())}


def _postprocess(device, resolution="auto", panoptic=True, instance=True):
    probs, masks, full, is_thing = _random_case(1)
    model = SimpleNamespace(semantic_on=True, panoptic_on=panoptic, instance_on=instance,
                            semantic_resolution=resolution, is_thing=is_thing, object_mask_threshold=0.0,
                            overlap_threshold=0.0, detections_per_image=20,
                            sem_seg_output="scores")
    return OpenVocabMaskSegmentor.postprocess(model, probs.to(device), masks.logits.to(device), (20, 24), (18, 21),
                                              27, 31), probs, masks, full


def test_every_output_is_on_the_masks_device():
    out = _postprocess("cpu")[0]
    assert _devices(out) == {torch.device("cpu")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_output_is_on_cuda():
    out = _postprocess("cuda")[0]
    assert {d.type for d in _devices(out)} == {"cuda"}


def test_semantic_resolution_auto_follows_fcclip():
    padded, image, output = (20, 24), (18, 21), (27, 31)
    for panoptic, instance in ((True, False), (False, True), (False, False)):
        out, probs, masks, full = _postprocess("cpu", "auto", panoptic, instance)
        if panoptic or instance:  # FC-CLIP: masks to the output size, then sigmoid and sum
            ref = torch.einsum("qc,qhw->chw", probs[:, :-1], full.sigmoid())
        else:  # semantic only: sigmoid at the padded size, sum, then crop and resize the class scores
            at_padded = F.interpolate(masks.logits[None], size=padded, mode="bilinear", align_corners=False)[0]
            ref = sem_seg_postprocess(torch.einsum("qc,qhw->chw", probs[:, :-1], at_padded.sigmoid()), image, *output)
        torch.testing.assert_close(out["sem_seg"], ref, rtol=1e-5, atol=1e-6)


def test_semantic_inference_is_probability_weighted_mask_sum():
    probs, masks = _random(0)
    out = semantic_inference(probs, masks)
    ref = torch.zeros(5, 20, 24)
    for q in range(len(probs)):
        for c in range(5):
            ref[c] += probs[q, c] * masks[q]
    torch.testing.assert_close(out, ref)
    # OutputMasks: summed a few queries at a time
    logits = torch.randn(12, 5, 6)
    chunked = semantic_inference(probs, OutputMasks(logits, (20, 24), (20, 24), (20, 24)))
    full = F.interpolate(logits[None], size=(20, 24), mode="bilinear", align_corners=False)[0].sigmoid()
    torch.testing.assert_close(chunked, torch.einsum("qc,qhw->chw", probs[:, :-1], full))


def test_output_masks_are_fp32_after_autocast():
    logits = torch.randn(5, 6, 8).bfloat16()
    masks = OutputMasks(logits, (24, 32), (22, 30), (11, 15))
    assert masks[[0, 3]].dtype == torch.float32 and masks[[0, 3]].shape == (2, 11, 15)
    torch.testing.assert_close(masks[[0, 3]], OutputMasks(logits.float(), (24, 32), (22, 30), (11, 15))[[0, 3]])


def fcclip_ensemble(in_logits, out_logits, seen, alpha, beta, valid=None):
    """FC-CLIP's ensemble as written in `FCCLIP.forward`, up to the log(p + 1e-8) its post-processing
    softmaxes again."""
    p_in = in_logits[..., :-1].softmax(-1)
    p_out = out_logits.softmax(-1)
    a = torch.ones_like(p_in) * alpha
    b = torch.ones_like(p_in) * beta
    if valid is not None:
        a, b = a * valid[..., None], b * valid[..., None]
    seen = seen.long()
    cls = (p_in ** (1 - a) * p_out ** a).log() * seen + (p_in ** (1 - b) * p_out ** b).log() * (1 - seen)
    void = in_logits.softmax(-1)[..., -1:]
    probs = torch.cat([cls.softmax(-1) * (1 - void), void], dim=-1)
    return torch.log(probs + 1e-8).softmax(-1)


@pytest.mark.parametrize("seed", range(10))
def test_geometric_ensemble_equals_fcclip(seed):
    g = torch.Generator().manual_seed(seed)
    in_logits = torch.randn(2, 7, 6, generator=g) * 4  # 5 classes + void
    out_logits = torch.randn(2, 7, 5, generator=g) * 4
    seen = torch.rand(5, generator=g) < 0.5
    valid = torch.rand(2, 7, generator=g) < 0.7
    for alpha, beta in ((0.4, 0.8), (0.0, 1.0), (0.35, 0.65)):
        torch.testing.assert_close(geometric_ensemble(in_logits, out_logits, seen, alpha, beta),
                                   fcclip_ensemble(in_logits, out_logits, seen, alpha, beta), rtol=1e-5, atol=1e-7)
        out = geometric_ensemble(in_logits, out_logits, seen, alpha, beta, valid)
        torch.testing.assert_close(out, fcclip_ensemble(in_logits, out_logits, seen, alpha, beta, valid.float()),
                                   rtol=1e-5, atol=1e-7)
        # a query with no valid mask: the in-vocabulary classifier alone, void kept
        ref = torch.cat([in_logits[..., :-1].softmax(-1) * (1 - in_logits.softmax(-1)[..., -1:]),
                         in_logits.softmax(-1)[..., -1:]], -1)
        torch.testing.assert_close(out[~valid], ((ref + 1e-8).log().softmax(-1))[~valid], rtol=1e-5, atol=1e-7)


def test_geometric_ensemble_by_hand():
    in_logits = torch.tensor([[1.0, 2.0, 0.5]])  # 2 classes + void
    out_logits = torch.tensor([[3.0, 0.0]])
    p_in = [math.exp(1) / (math.exp(1) + math.exp(2)), math.exp(2) / (math.exp(1) + math.exp(2))]
    p_out = [math.exp(3) / (math.exp(3) + 1), 1 / (math.exp(3) + 1)]
    void = math.exp(0.5) / (math.exp(1) + math.exp(2) + math.exp(0.5))
    e = [p_in[0] ** 0.6 * p_out[0] ** 0.4, p_in[1] ** 0.2 * p_out[1] ** 0.8]  # class 0 seen, class 1 unseen
    p = [v / sum(e) * (1 - void) for v in e] + [void]
    p = [(v + 1e-8) / (1 + 3e-8) for v in p]
    out = geometric_ensemble(in_logits, out_logits, torch.tensor([True, False]), 0.4, 0.8)
    torch.testing.assert_close(out[0], torch.tensor(p), rtol=1e-6, atol=1e-8)


def test_binary_mask_pooling_equals_fcclip_mask_pooling():
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(2, 8, 3, 4, generator=g)
    logits = torch.randn(2, 5, 12, 16, generator=g) * 3
    logits[1, 2] = -1.0  # empty mask: zero feature, zero logits
    text = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    out = out_of_vocab_logits(dense, logits, text, scale=50.0, binary=True)
    grid = F.interpolate(logits, size=(3, 4), mode="bilinear", align_corners=False)  # as MaskPooling
    for b in range(2):
        for q in range(5):
            acc, n = torch.zeros(8), 0
            for y in range(3):
                for x in range(4):
                    if grid[b, q, y, x] > 0:
                        acc += dense[b, :, y, x]
                        n += 1
            feat = F.normalize(acc / (n + 1e-8), dim=0)
            torch.testing.assert_close(out[b, q], 50.0 * text @ feat, rtol=1e-5, atol=1e-5)
    assert (out[1, 2] == 0).all()


def test_out_of_vocab_logits_soft_pooling_are_mask_averages_of_clip_features():
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


def test_classifiers_take_the_max_over_synonym_logits():
    g = torch.Generator().manual_seed(2)
    owner = torch.tensor([0, 1, 1, 1, 2, 3, 3])  # 4 classes, 7 synonyms
    rows = F.normalize(torch.randn(7, 8, generator=g), dim=-1)
    text = ClassText(rows, 4, owner)
    clf = InVocabClassifier(8, logit_scale=10.0, learn_logit_scale=False)
    embeds = torch.randn(2, 3, 8, generator=g)
    logits = clf(embeds, text)
    per_synonym = clf(embeds, rows)  # (2, 3, 7 + 1)
    dense, masks = torch.randn(2, 8, 3, 4, generator=g), torch.randn(2, 3, 6, 8, generator=g)
    out = out_of_vocab_logits(dense, masks, text, binary=True)
    out_rows = out_of_vocab_logits(dense, masks, rows, binary=True)
    for c in range(4):
        mine = [s for s in range(7) if owner[s] == c]
        torch.testing.assert_close(logits[..., c], per_synonym[..., mine].max(-1).values)
        torch.testing.assert_close(out[..., c], out_rows[..., mine].max(-1).values)
    torch.testing.assert_close(logits[..., -1], per_synonym[..., -1])  # void


def test_in_vocab_classifier_is_scaled_cosine_with_void_last():
    clf = InVocabClassifier(8, logit_scale=10.0, learn_logit_scale=False)
    embeds = torch.randn(1, 3, 8)
    text = F.normalize(torch.randn(4, 8), dim=-1)
    out = clf(embeds, text)
    void = F.normalize(clf.void_embedding[0], dim=0)
    ref = 10.0 * F.normalize(embeds, dim=-1) @ torch.cat([text, void[None]]).t()
    torch.testing.assert_close(out, ref)
    assert not any(p is clf.log_scale for p in clf.parameters())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_semantic_labels_are_the_argmax_of_the_scores_without_holding_them(seed):
    """The banded label map equals argmax over classes of semantic_inference (where the top two scores are not
    within float rounding), for OutputMasks (resize as per-axis matrices) and probability tensors, at bands of
    one row and of the whole image."""
    from ovseg.modeling.postprocessing import semantic_labels

    probs, masks, full, _ = _random_case(seed)
    ref_scores = semantic_inference(probs, full.sigmoid())  # written-out masks at output resolution
    top2 = ref_scores.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-4
    for m in (masks, full.sigmoid()):
        for max_elements in (1, 1 << 30):
            labels = semantic_labels(probs, m, max_elements=max_elements)
            assert labels.shape == ref_scores.shape[1:] and labels.dtype == torch.int64
            assert torch.equal(labels[clear], ref_scores.argmax(0)[clear])
    assert clear.float().mean() > 0.9
