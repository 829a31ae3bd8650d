"""The SCLIP / ClearCLIP / NACLIP presets against the authors' whole inference, end to end.

Each reference below is a plain re-implementation of one authors' pipeline on tensors, step by step as their code
runs it (SCLIP b56bd30 `clip_segmentor.py` + `clip/model.py`, ClearCLIP ad68a40 `clearclip_segmentor.py` +
`open_clip/transformer.py`, NACLIP 0cac3a6 `naclip.py` + `clip/model.py`): their ViT forward with their
positional-embedding rule and last block, one text query per class name, sliding windows on the pixel grid (or the
whole image), per-window upsampling and image-space averaging, resize to the original size, PAMR, softmax over all
queries, maximum over a class's names, area and background rules. ovseg's preset runs on the same tiny random CLIP,
image and synonym-bearing class list; the per-pixel labels must agree on >= 99 % of the pixels.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from ovseg.config import get_ovseg_cfg
from ovseg.modeling.pamr import PAMR
from ovseg.modeling.text import TEMPLATE_SETS
from tests.helpers import TINY_VIT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUTHORS_MEAN = torch.tensor([122.771, 116.746, 104.094]).view(3, 1, 1)
AUTHORS_STD = torch.tensor([68.501, 66.632, 70.323]).view(3, 1, 1)
# a class list in the authors' format (names split at ", "), background first, with several names per class
CLASS_LINES = ["sky, wall, tree, grass", "cat, kitty", "dog", "person, person in shirt, man", "car, automobile"]


# ---------------------------------------------------------------- the authors' steps, written out


def authors_queries(text_model, tokenizer, templates):
    """get_cls_idx + the query loop of their __init__: every name its own query, templates averaged."""
    names, idx = [], []
    for i, line in enumerate(CLASS_LINES):
        for n in line.split(", "):
            names.append(n)
            idx.append(i)
    feats = []
    with torch.no_grad():
        for n in names:
            f = text_model.encode_text(tokenizer([t.format(n) for t in templates]))
            f = f / f.norm(dim=-1, keepdim=True)
            f = f.mean(0)
            feats.append(f / f.norm())
    return torch.stack(feats), torch.tensor(idx)


def naclip_addition(h, w, std):
    """NACLIP's gaussian_window + get_attention_addition: a (2h-1, 2w-1) Gaussian correlated with one-hot maps."""
    c = 1 / (std * math.sqrt(2))
    ks = [torch.linspace(-(d - 1) / 2.0 * c, (d - 1) / 2.0 * c, d) for d in (2 * h - 1, 2 * w - 1)]
    window = torch.exp(-(ks[0][:, None] ** 2 + ks[1][None] ** 2))
    eye = torch.eye(h * w).view(h * w, 1, h, w)
    out = F.conv2d(eye, window[None, None], padding="same").view(h * w, h * w)
    return F.pad(out, (1, 0, 1, 0))  # class token row/column unbiased


def authors_encode(visual, img, method, sigma=5.0):
    """Their VisionTransformer.forward(return_all=True): (1, 3, H, W) -> (1, 1 + gh*gw, D) (not normalised)."""
    _, _, h_img, w_img = img.shape
    p = visual.conv1.kernel_size[0]
    x = visual.conv1(img)  # the stride-p convolution drops a remainder of H, W
    gh, gw = x.shape[-2:]
    x = x.reshape(1, x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.view(1, 1, -1), x], dim=1)
    pos = visual.positional_embedding
    if x.shape[1] != pos.shape[0]:  # interpolate_pos_encoding
        n = pos.shape[0] - 1
        s = int(math.sqrt(n))
        grid = pos[1:].reshape(1, s, s, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h_img // p + 0.1) / math.sqrt(n), (w_img // p + 0.1) / math.sqrt(n)),
                             mode="bicubic")
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])
    x = visual.ln_pre(x + pos)
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)
    blk = visual.transformer.resblocks[-1]
    attn = blk.attn
    y = blk.ln_1(x)
    heads, n_tok, c = attn.num_heads, y.shape[1], y.shape[2]
    hd = c // heads
    q, k, v = (t.reshape(n_tok, heads, hd).transpose(0, 1)
               for t in F.linear(y[0], attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1))  # (heads, N, hd)
    scale = hd ** -0.5
    if method == "sclip":
        weights = F.softmax(q @ q.transpose(1, 2) * scale, -1) + F.softmax(k @ k.transpose(1, 2) * scale, -1)
    elif method == "clearclip":
        weights = F.softmax(q @ q.transpose(1, 2) * scale, -1)
    else:
        weights = F.softmax(k @ k.transpose(1, 2) * scale + naclip_addition(gh, gw, sigma), -1)
    out = attn.out_proj((weights @ v).transpose(0, 1).reshape(1, n_tok, c))
    if method == "sclip":  # residual + FFN kept; ClearCLIP (ignore_residual) and NACLIP (arch='reduced') drop both
        x = x + out
        x = x + blk.mlp(blk.ln_2(x))
    else:
        x = out
    return visual.ln_post(x) @ visual.proj


def forward_feature(visual, crop, queries, method):
    """Their forward_feature: patch cosine logits (1, Q, gh, gw), bilinearly upsampled to the crop's size."""
    feats = authors_encode(visual, crop, method)[:, 1:]
    feats = feats / feats.norm(dim=-1, keepdim=True)
    logits = feats @ queries.T
    p = visual.conv1.kernel_size[0]
    gh, gw = crop.shape[-2] // p, crop.shape[-1] // p
    logits = logits.permute(0, 2, 1).reshape(1, -1, gh, gw)
    return F.interpolate(logits, size=crop.shape[-2:], mode="bilinear")


def forward_slide(visual, img, queries, method, stride, crop_size):
    """Their forward_slide up to preds / count_mat (image space, the resized image's size)."""
    _, _, h_img, w_img = img.shape
    h_grids = max(h_img - crop_size + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop_size + stride - 1, 0) // stride + 1
    preds = img.new_zeros((1, len(queries), h_img, w_img))
    count = img.new_zeros((1, 1, h_img, w_img))
    p = visual.conv1.kernel_size[0]
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * stride, wi * stride
            y2, x2 = min(y1 + crop_size, h_img), min(x1 + crop_size, w_img)
            y1, x1 = max(y2 - crop_size, 0), max(x2 - crop_size, 0)
            crop = img[:, :, y1:y2, x1:x2]
            hh, ww = crop.shape[2:]
            pad = (0, 0, 0, 0)
            if method == "clearclip":  # compute_padsize: centred zero padding to the patch size
                lr, tb = (p - ww % p) % p, (p - hh % p) % p
                pad = (lr // 2, lr - lr // 2, tb // 2, tb - tb // 2)
                crop = F.pad(crop, pad)
            logit = forward_feature(visual, crop, queries, method)
            logit = logit[:, :, pad[2]:pad[2] + hh, pad[0]:pad[0] + ww]
            preds += F.pad(logit, (x1, w_img - x2, y1, h_img - y2))
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


def authors_predict(method, visual, img, queries, query_idx, ori_shape, *, slide_crop, slide_stride, logit_scale,
                    prob_thd, area_thd=None, pamr_steps=0):
    """predict + postprocess_result: (1, 3, h, w) normalised image -> (H, W) labels at the original size."""
    if slide_crop > 0:
        logits = forward_slide(visual, img, queries, method, slide_stride, slide_crop)
    else:  # NACLIP's whole-image path: the stretched logits at the image size, then the resize below
        logits = forward_feature(visual, img, queries, method)
    logits = F.interpolate(logits, size=ori_shape, mode="bilinear")
    if pamr_steps:
        logits = PAMR(pamr_steps, (8, 16))(F.interpolate(img, size=ori_shape, mode="bilinear"), logits)
    probs = (logits[0] * logit_scale).softmax(0)
    num_cls = int(query_idx.max()) + 1
    cls_index = F.one_hot(query_idx).T.view(num_cls, len(query_idx), 1, 1)
    probs = (probs[None] * cls_index).max(1)[0]
    if area_thd is not None:  # SCLIP: foreground classes with a small argmax area are zeroed
        pred = F.one_hot(probs.argmax(0), num_cls).to(probs.dtype)
        area = pred[:, :, 1:].sum((0, 1), keepdim=True)
        keep = (area > area_thd * area.sum()).to(probs.dtype)
        probs[1:] *= keep.transpose(0, -1)  # (C - 1, 1, 1)
    labels = probs.argmax(0)
    labels[probs.max(0)[0] < prob_thd] = 0
    return labels


# ---------------------------------------------------------------- ovseg's presets on the same inputs


def preset_model(preset, **overrides):
    cfg = get_ovseg_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs", "trainingfree", preset))
    opts = {"MODEL.CLIP.MODEL_NAME": TINY_VIT, "MODEL.CLIP.PRETRAINED": "", "MODEL.DEVICE": "cpu",
            "MODEL.TEXT.TEMPLATES": "simple", "MODEL.TEXT.VOCABULARY": ",".join(ln.replace(", ", "|")
                                                                               for ln in CLASS_LINES),
            "MODEL.DENSE_SEG.BACKGROUND_CLASS": "sky", **overrides}
    cfg.merge_from_list([x for kv in opts.items() for x in kv])
    torch.manual_seed(0)
    return build_model(cfg).eval()


# (preset, the authors' settings of that benchmark scaled to the tiny 64-px model, ovseg overrides)
CASES = {
    "sclip": ("sclip/voc21.yaml", dict(slide_crop=32, slide_stride=16, logit_scale=65, prob_thd=0.1, area_thd=0.1),
              {"MODEL.DENSE_SEG.WINDOW_SIZE": 32, "MODEL.DENSE_SEG.WINDOW_STRIDE": 16}),
    "clearclip": ("clearclip/pc60.yaml", dict(slide_crop=48, slide_stride=24, logit_scale=50, prob_thd=0.15),
                  {"MODEL.DENSE_SEG.WINDOW_SIZE": 48, "MODEL.DENSE_SEG.WINDOW_STRIDE": 24}),
    "naclip": ("naclip/voc21.yaml", dict(slide_crop=0, slide_stride=0, logit_scale=40, prob_thd=0.1, pamr_steps=10),
               {}),
    "naclip_slide": ("naclip/pc60.yaml", dict(slide_crop=48, slide_stride=24, logit_scale=40, prob_thd=0.1,
                                              pamr_steps=10),
                     {"MODEL.DENSE_SEG.WINDOW_SIZE": 48, "MODEL.DENSE_SEG.WINDOW_STRIDE": 24}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("hw,ori", [((48, 80), (60, 100)), ((40, 75), (52, 97))], ids=["aligned", "unaligned"])
def test_preset_reproduces_the_authors_pipeline(case, hw, ori):
    preset, settings, overrides = CASES[case]
    method = case.split("_")[0]
    model = preset_model(preset, **overrides)
    image = torch.randint(0, 256, (3, *hw), generator=torch.Generator().manual_seed(1)).float()
    tc = model.text_classifier
    visual = model.backbone.tower.visual
    with torch.no_grad():
        got = model([{"image": image, "height": ori[0], "width": ori[1]}])[0]["sem_seg"].argmax(0)
        queries, idx = authors_queries(tc.text_model, tc.tokenizer, TEMPLATE_SETS["simple"])
        x = ((image - AUTHORS_MEAN) / AUTHORS_STD)[None]
        ref = authors_predict(method, visual, x, queries, idx, ori, **settings)
    assert got.shape == ref.shape == ori
    assert len(ref.unique()) >= 2  # not a trivial one-label map
    agreement = (got == ref).float().mean().item()
    assert agreement >= 0.99, f"{case} {hw}: {100 * agreement:.2f} % of pixels agree with the authors' pipeline"
