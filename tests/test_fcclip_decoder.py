"""The masked-attention decoder against a written-out version of Mask2Former's decoder loop with FC-CLIP's class
head (github.com/bytedance/fc-clip, fcclip/modeling/transformer_decoder/fcclip_transformer_decoder.py), on random
inputs with the module's own weights; and Mask2Former's initialisation of the decoder."""
import math

import pytest
import torch
import torch.nn.functional as F

from ovseg.modeling.position_encoding import sine_position_encoding
from ovseg.modeling.transformer_decoder import MaskedAttentionDecoder


def _decoder(class_head="fcclip", in_channels=32, seed=0, perturb=True):
    torch.manual_seed(seed)
    dec = MaskedAttentionDecoder(in_channels=in_channels, mask_dim=32, embed_dim=24, hidden_dim=32, num_queries=6,
                                 heads=4, ffn_dim=48, layers=4, num_levels=3, class_head=class_head)
    if not perturb:
        return dec
    with torch.no_grad():  # nothing of the reference may hide behind a zero parameter
        dec.level_embed.weight.normal_(std=1.0)
        for p in dec.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return dec


def _inputs(seed=1, b=2):
    g = torch.Generator().manual_seed(seed)
    multi_scale = [torch.randn(b, 32, s, s + 1, generator=g) for s in (3, 5, 7)]
    return multi_scale, torch.randn(b, 32, 14, 15, generator=g)


def reference(dec, multi_scale, mask_features):
    """Mask2Former's forward, written out: level embedding added to the projected features (the attention's
    keys and values), per-head boolean masks, a fully blocked row unblocked; FC-CLIP's class head."""
    heads = dec.layers[0].cross_attn.num_heads
    src, pos, sizes = [], [], []
    for i in range(dec.num_levels):
        x = multi_scale[i]
        sizes.append(x.shape[-2:])
        pe = sine_position_encoding(x.shape[-2], x.shape[-1], 32)
        pos.append(pe.flatten(1).t()[None])  # (1, HW, C)
        src.append((dec.input_proj[i](x).flatten(2) + dec.level_embed.weight[i][None, :, None]).transpose(1, 2))
    b = mask_features.shape[0]
    out = dec.query_feat.weight[None].repeat(b, 1, 1)
    qpos = dec.query_pos.weight[None].repeat(b, 1, 1)

    def heads_of(out, size):
        d = dec.norm(out)
        masks = torch.einsum("bqc,bchw->bqhw", dec.mask_embed(d), mask_features)
        if dec.class_head == "fcclip":
            m = (masks > 0).float()
            m = m / (m.sum(dim=(-1, -2), keepdim=True) + 1e-8)
            pooled = torch.einsum("bchw,bqhw->bqc", mask_features, m)
            cls = dec.class_embed(d + dec.mask_pooling_proj(pooled))
        else:
            cls = dec.class_embed(d)
        small = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        blocked = (small.sigmoid().flatten(2).unsqueeze(1).repeat(1, heads, 1, 1).flatten(0, 1) < 0.5)
        return cls, masks, blocked

    preds = []
    cls, masks, blocked = heads_of(out, sizes[0])
    preds.append((cls, masks))
    for i, layer in enumerate(dec.layers):
        lvl = i % dec.num_levels
        blocked[torch.where(blocked.sum(-1) == blocked.shape[-1])] = False
        a = layer.cross_attn(out + qpos, src[lvl] + pos[lvl], src[lvl], attn_mask=blocked, need_weights=False)[0]
        out = layer.sub[0].norm(out + a)
        a = layer.self_attn(out + qpos, out + qpos, out, need_weights=False)[0]
        out = layer.sub[1].norm(out + a)
        out = layer.sub[2].norm(out + layer.ffn(out))
        cls, masks, blocked = heads_of(out, sizes[(i + 1) % dec.num_levels])
        preds.append((cls, masks))
    return preds


@pytest.mark.parametrize("class_head", ["fcclip", "linear"])
@pytest.mark.parametrize("seed", [0, 1])
def test_decoder_equals_written_out_mask2former_with_fcclip_head(class_head, seed):
    dec = _decoder(class_head, seed=seed)
    multi_scale, mask_features = _inputs(seed + 10)
    with torch.no_grad():
        ref = reference(dec, multi_scale, mask_features)
        dec.train()
        out = dec(multi_scale, mask_features)
        ours = [(a["pred_embeds"], a["pred_masks"]) for a in out["aux_outputs"]]
        ours.append((out["pred_embeds"], out["pred_masks"]))
        dec.eval()
        final = dec(multi_scale, mask_features)
    assert len(ours) == len(ref) == len(dec.layers) + 1
    for (e, m), (re, rm) in zip(ours, ref):
        torch.testing.assert_close(m, rm, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(e, re, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final["pred_embeds"], ref[-1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final["pred_masks"], ref[-1][1], atol=1e-4, rtol=1e-4)


def test_level_embedding_changes_the_output():
    """Added to the values too, the level embedding is no constant shift inside each softmax."""
    dec = _decoder()
    multi_scale, mask_features = _inputs()
    dec.eval()
    with torch.no_grad():
        a = dec(multi_scale, mask_features)["pred_masks"]
        dec.level_embed.weight.add_(1.0)
        b = dec(multi_scale, mask_features)["pred_masks"]
    assert (a - b).abs().max() > 1e-2


def test_class_head_gradient_reaches_mask_features_not_through_the_mask():
    dec = _decoder()
    multi_scale, mask_features = _inputs()
    mask_features.requires_grad_(True)
    dec.train()
    out = dec(multi_scale, mask_features)
    out["pred_embeds"].sum().backward()
    assert mask_features.grad.abs().sum() > 0  # the pooled features feed the class head
    assert all(p.grad is not None for p in dec.mask_pooling_proj.parameters())


def test_bad_class_head_is_a_clear_error():
    with pytest.raises(ValueError, match="CLASS_HEAD"):
        _decoder("mlp")


def test_mask2former_initialisation():
    """Attention / FFN matrices xavier-uniform (bound sqrt(6 / (fan_in + fan_out))), 1x1 input projections
    c2_xavier (kaiming-uniform a=1: bound sqrt(3 / fan_in), zero bias); PyTorch's defaults have other bounds."""
    dec = _decoder(in_channels=48, perturb=False)
    for layer in dec.layers:
        for name, p in layer.named_parameters():
            if p.dim() < 2:
                continue
            bound = math.sqrt(6.0 / (p.shape[0] + p.shape[1]))
            assert p.abs().max() <= bound + 1e-6, name
            assert p.abs().max() > 0.9 * bound, name  # a uniform sample of this size reaches near its bound
    for proj in dec.input_proj:
        bound = math.sqrt(3.0 / 48)
        assert proj.weight.abs().max() <= bound + 1e-6 and proj.weight.abs().max() > 0.9 * bound
        assert torch.all(proj.bias == 0)
