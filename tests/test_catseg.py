"""CAT-Seg: each part of the head against a written-out computation, the q / v fine-tuning, the sliding-window
protocol, and training through the engine."""
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from ovseg import engine as train_net
from ovseg.modeling.backbone.clip_vit import CLIPViTDenseEncoder
from ovseg.modeling.clip_model import split_clip
from ovseg.modeling.cost_aggregation import (
    ClassAggregation,
    CostAggregator,
    GuidedWindowBlock,
    cost_volume,
    guided_linear,
    linear_attention,
)
from ovseg.modeling.text import parse_vocabulary
from ovseg.modeling.tiny_models import TINY_VIT
from tests.helpers import tiny_cfg
from tests.synthetic_panoptic import CATEGORIES, HELD_OUT, ColourText

TOL = dict(atol=1e-5, rtol=1e-4)


def tiny_catseg_cfg(**overrides):
    """CATSegSegmentor on the tiny random ViT (patch 16, 3 blocks, width 64, embedding dim 32): a 4x4 grid."""
    opts = dict(
        MODEL__META_ARCHITECTURE="CATSegSegmentor", MODEL__CLIP__FEATURE_BLOCKS="[0, 1]",
        MODEL__CLIP__DENSE_MODE="catseg", MODEL__TEXT__TEMPLATES="catseg", MODEL__CATSEG__CLIP_RESOLUTION="[64, 64]",
        MODEL__CATSEG__WINDOW_SIZE=2, MODEL__CATSEG__HIDDEN_DIM=32, MODEL__CATSEG__TEXT_GUIDANCE_PROJ_DIM=16,
        MODEL__CATSEG__APPEARANCE_GUIDANCE_PROJ_DIM=16, MODEL__CATSEG__DECODER_DIMS="[32, 16]",
        MODEL__CATSEG__DECODER_GUIDANCE_DIMS="[16, 8]", MODEL__CATSEG__DECODER_GUIDANCE_PROJ_DIMS="[8, 4]",
        MODEL__CATSEG__PAD_LEN=8, MODEL__CATSEG__SLIDE_RESIZE="[96, 96]", MODEL__CATSEG__SLIDE_WINDOW=64,
        MODEL__CATSEG__SLIDE_STRIDE=32, MODEL__TEXT__VOCABULARY="cat,dog,sky,road,tree")
    return tiny_cfg(**{**opts, **overrides})


def small_head(**kw):
    torch.manual_seed(0)
    args = dict(text_dim=12, appearance_dim=12, text_guidance_proj_dim=8, appearance_guidance_proj_dim=8,
                decoder_dims=(32, 16), decoder_guidance_dims=(8, 8), decoder_guidance_proj_dims=(4, 4),
                num_layers=2, num_heads=2, hidden_dim=16, pooling_size=(2, 2), window_size=2, num_prompts=2,
                pad_len=6)
    head = CostAggregator(**{**args, **kw}).eval()
    with torch.no_grad():  # zero-initialised padding tokens would hide their role
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return head


def head_inputs(num_classes, seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 12, 4, 4, generator=g)
    text = torch.randn(2, num_classes, 2, 12, generator=g)
    guidance = [torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 8, 16, 16, generator=g)]
    return image, text, guidance


def test_cost_volume_is_the_cosine_of_every_patch_and_prompt():
    image, text, _ = head_inputs(5)
    out = cost_volume(image, text)
    b, d, h, w = image.shape
    ref = torch.empty(b, text.shape[2], text.shape[1], h, w)
    for i, p, t, y, x in itertools.product(range(b), range(text.shape[2]), range(text.shape[1]), range(h), range(w)):
        ref[i, p, t, y, x] = F.cosine_similarity(image[i, :, y, x], text[i, t, p], dim=0)
    torch.testing.assert_close(out, ref, **TOL)


def test_linear_attention_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 4, generator=g) for _ in range(3))
    out = linear_attention(q, k, v)
    phi = lambda t: F.elu(t) + 1  # noqa: E731
    for n, length, hd in itertools.product(range(2), range(5), range(3)):
        weights = torch.stack([phi(q[n, length, hd]) @ phi(k[n, s, hd]) for s in range(5)])
        ref = (weights[:, None] * v[n, :, hd]).sum(0) / weights.sum()
        torch.testing.assert_close(out[n, length, hd], ref, atol=1e-5, rtol=1e-4)


def test_guided_linear_is_the_linear_of_the_concatenation_and_refuses_missing_guidance():
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(6 + 4, 5)
    x, guidance = torch.randn(2 * 3, 7, 6, generator=g), torch.randn(2, 7, 4, generator=g)  # 3 rows per guidance
    reference = linear(torch.cat([x, guidance.repeat_interleave(3, dim=0)], dim=-1))
    torch.testing.assert_close(guided_linear(linear, x, guidance), reference, **TOL)
    with pytest.raises(ValueError, match="got no guidance"):
        guided_linear(linear, x, None)
    unguided = torch.nn.Linear(6, 5)
    torch.testing.assert_close(guided_linear(unguided, x, None), unguided(x))


@pytest.mark.parametrize("shifted", [False, True])
def test_window_block_attends_within_its_shifted_window(shifted):
    """Brute force: each token attends (softmax) to the tokens of its window on the cyclically shifted grid that
    were also neighbours before the shift (Swin's mask)."""
    torch.manual_seed(0)
    h = w = 8
    window, dim, gdim, heads = 4, 8, 4, 2
    blk = GuidedWindowBlock(dim, gdim, heads, window, shifted).eval()
    x, guide = torch.randn(2, h * w, dim), torch.randn(2, h * w, gdim)
    out = blk(x, guide, (h, w))

    shift = window // 2 if shifted else 0
    y = torch.cat([blk.norm1(x), guide], -1)  # (2, hw, dim + gdim)
    q, k, v = blk.attn.q(y), blk.attn.k(y), blk.attn.v(y[..., :dim])
    hd = dim // heads

    def cell(i):  # window and pre-shift band of token i on the rolled grid
        r, c = divmod(i, w)
        rr, cc = (r - shift) % h, (c - shift) % w  # position after rolling by -shift
        band = lambda p, n: 0 if p < n - window else (1 if p < n - shift else 2)  # noqa: E731
        return (rr // window, cc // window), (band(rr, h), band(cc, w)) if shift else None

    ref = torch.empty(2, h * w, dim)
    cells = [cell(i) for i in range(h * w)]
    for n, i in itertools.product(range(2), range(h * w)):
        allowed = [j for j in range(h * w) if cells[j] == cells[i]]
        heads_out = []
        for a in range(heads):
            sl = slice(a * hd, (a + 1) * hd)
            att = torch.softmax(torch.stack([q[n, i, sl] @ k[n, j, sl] for j in allowed]) * hd ** -0.5, 0)
            heads_out.append((att[:, None] * v[n, allowed, sl]).sum(0))
        ref[n, i] = blk.attn.proj(torch.cat(heads_out))
    ref = x + ref
    ref = ref + blk.mlp(blk.norm2(ref))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attention,num_classes,pad_len", [("linear", 3, 6), ("linear", 7, 0), ("full", 5, 6)])
def test_class_aggregation_is_permutation_equivariant(attention, num_classes, pad_len):
    torch.manual_seed(0)
    layer = ClassAggregation(16, 8, 2, attention, (2, 2), pad_len).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, guide = torch.randn(2, 16, num_classes, 4, 4), torch.randn(2, num_classes, 8)
    perm = torch.randperm(num_classes)
    out = layer(x, guide)
    assert out.shape == x.shape
    torch.testing.assert_close(layer(x[:, :, perm], guide[:, perm]), out[:, :, perm], **TOL)


@pytest.mark.parametrize("num_classes", [6, 8])  # exactly pad_len, and more (nothing padded)
def test_padding_tokens_get_a_gradient_when_nothing_is_padded(num_classes):
    # DDP (find_unused_parameters off) fails on a trainable parameter without a gradient
    layer = ClassAggregation(16, 8, 2, "linear", (2, 2), 6)
    x, guide = torch.randn(1, 16, num_classes, 4, 4), torch.randn(1, num_classes, 8)
    layer(x, guide).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize("num_classes", [3, 8])  # padded, and cut to pad_len (nothing padded)
def test_padding_keeps_the_autocast_dtype(num_classes):
    # cat with the fp32 padding tokens would promote every class token to fp32 under bf16 autocast
    layer = ClassAggregation(16, 8, 2, "linear", (2, 2), 6)
    seen = []
    layer.norm1.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    x, guide = torch.randn(1, 16, num_classes, 4, 4), torch.randn(1, num_classes, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x.bfloat16(), guide.bfloat16())
    assert seen == [torch.bfloat16]


@pytest.mark.parametrize("num_classes", [4, 9])  # below and above pad_len (cut to the 6 most similar)
def test_head_is_equivariant_over_classes_and_chunking_changes_nothing(num_classes):
    image, text, guidance = head_inputs(num_classes)
    head = small_head()
    with torch.no_grad():
        out = head(image, text, image, guidance)
        assert out.shape == (2, num_classes, 16, 16)
        perm = torch.randperm(num_classes)
        torch.testing.assert_close(head(image, text[:, perm], image, guidance), out[:, perm], **TOL)
        chunked = small_head(class_chunk=2)
        torch.testing.assert_close(chunked(image, text, image, guidance), out, **TOL)
    if num_classes > head.pad_len:  # the classes cut away: logit -100 exactly where CLIP's best match is lowest
        best = cost_volume(image, text).transpose(1, 2).flatten(2).amax(-1)  # (B, T)
        for b in range(2):
            cut = best[b].argsort()[:num_classes - head.pad_len]
            assert (out[b, cut] == -100).all() and (out[b, best[b].argsort()[-head.pad_len:]] != -100).all()


def test_catseg_dense_mode_is_value_path_plus_class_token(tiny_clip):
    """CAT-Seg's dense last block written out on open_clip's block: v = out_proj(W_v ln_1(x) + b_v) + x_cls, then
    v + mlp(ln_2(v)); ln_post and proj after."""
    visual, _ = split_clip(tiny_clip(TINY_VIT, seed=3))
    enc = CLIPViTDenseEncoder(visual=visual, dense_mode="catseg").eval()
    img = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        _, last, _ = enc.forward_tokens(img)
        x = visual.conv1(img).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], 1)
        from ovseg.modeling.backbone.clip_vit import resize_pos_embed
        x = visual.ln_pre(x + resize_pos_embed(visual.positional_embedding, (4, 4), (4, 3), 1))
        for blk in visual.transformer.resblocks[:-1]:
            x = blk(x)
        blk = visual.transformer.resblocks[-1]
        c = x.shape[-1]
        v = F.linear(blk.ln_1(x), blk.attn.in_proj_weight[2 * c:], blk.attn.in_proj_bias[2 * c:])
        v = blk.attn.out_proj(v) + x[:, :1]
        ref = v + blk.mlp(blk.ln_2(v))
    torch.testing.assert_close(last, ref, **TOL)


def test_one_window_slide_equals_whole_and_windows_merge_as_fold():
    cfg = tiny_catseg_cfg(MODEL__CATSEG__SLIDE_RESIZE="[64, 64]")
    model = build_model(cfg).eval()
    text = model.class_embeddings(model.vocabulary)
    image = model.normalize(torch.randint(0, 255, (3, 64, 64)).float())
    with torch.no_grad():
        slide = model.segment(image, text, (50, 70))
        model.inference_mode = "whole"
        whole = model.segment(image, text, (50, 70))
        torch.testing.assert_close(slide, whole, **TOL)

        # 2 x 2 windows + global view: the authors' merge through torch's fold / unfold, written independently
        model.inference_mode, model.slide_resize = "slide", (96, 96)
        image = model.normalize(torch.randint(0, 255, (3, 80, 120)).float())
        out = model.segment(image, text, (40, 60))
        k, s = 64, 32
        resized = F.interpolate(image[None], size=(96, 96), mode="bilinear", align_corners=False)
        crops = F.unfold(resized, k, stride=s).view(3, k, k, -1).permute(3, 0, 1, 2)  # (L, 3, k, k)
        views = torch.cat([crops, F.interpolate(image[None], size=(k, k), mode="bilinear", align_corners=False)])
        probs = F.interpolate(model.logits(views, text), size=(k, k), mode="bilinear", align_corners=False).sigmoid()
        local = probs[:-1]
        fold = lambda t: F.fold(t, (96, 96), k, stride=s)  # noqa: E731
        merged = fold(local.flatten(1).T[None]) / fold(F.unfold(torch.ones(1, 1, 96, 96), k, stride=s))
        glob = F.interpolate(probs[-1:], size=(96, 96), mode="bilinear", align_corners=False)
        ref = F.interpolate((merged + glob) / 2, size=(40, 60), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out, ref, **TOL)


def test_only_query_value_weights_of_clip_train(tmp_path):
    """Through the trainer's optimizer (AdamW, weight decay on): after steps, CLIP's q and v rows moved, the key
    rows, biases and every other CLIP parameter did not; the head trained; CLIP at its own learning rate."""
    cfg = tiny_catseg_cfg(SOLVER__BASE_LR=1e-2, SOLVER__WEIGHT_DECAY=0.1, MODEL__CATSEG__CLIP_LR_MULTIPLIER=0.5,
                          SOLVER__CLIP_GRADIENTS__ENABLED=True, SOLVER__CLIP_GRADIENTS__CLIP_TYPE="full_model")
    model = build_model(cfg)
    model._train_vocabulary = parse_vocabulary("cat,dog,sky")
    model.train()
    optimizer = train_net.Trainer.build_optimizer(cfg, model)
    lrs = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = [{"image": torch.randint(0, 255, (3, 64, 64)).float(), "sem_seg": torch.randint(0, 3, (64, 64))}
             for _ in range(2)]
    for _ in range(3):
        optimizer.zero_grad()
        model(batch)["loss_sem_seg"].backward()
        for n, p in model.named_parameters():
            if n.endswith("attn.in_proj_weight"):
                c = p.shape[1]
                assert p.grad[c:2 * c].abs().max() == 0 and p.grad[2 * c:].abs().max() > 0, n
        optimizer.step()
    clip_names = [n for n in before if n.startswith(("backbone.", "text_classifier."))]
    last_q = f"backbone.tower.visual.transformer.resblocks.{len(model.backbone.tower.blocks) - 1}.attn.in_proj_weight"
    assert any("text_classifier" in n and "in_proj_weight" in n for n in clip_names)
    for n in clip_names:
        p = dict(model.named_parameters())[n]
        if n.endswith("attn.in_proj_weight"):
            c = p.shape[1]
            # the last visual block's dense output is its value path: its queries get no gradient
            assert torch.equal(p[:c], before[n][:c]) == (n == last_q), n
            assert not torch.equal(p[2 * c:], before[n][2 * c:]), n
            assert torch.equal(p[c:2 * c], before[n][c:2 * c]), f"{n}: key rows moved"
            assert lrs[id(p)] == (1e-2 * 0.5, 0.0)
        else:
            assert torch.equal(p, before[n]), f"{n} changed"
            assert id(p) not in lrs
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith("head.layers.0."))


@pytest.fixture
def dataset(tmp_path):
    from tests.synthetic_panoptic import make_dataset
    return make_dataset(tmp_path / "data", n_train=16, n_val=6, prefix="synth_catseg")


def _train_cfg(tmp_path, train, val, iters, **overrides):
    opts = dict(
        DATASETS__TRAIN=f"('{train}',)", DATASETS__TEST=f"('{val}',)", MODEL__TEXT__VOCABULARY="",
        INPUT__DATASET_MAPPER_NAME="mask_semantic", INPUT__MIN_SIZE_TRAIN="(64,)", INPUT__MAX_SIZE_TRAIN=1000,
        INPUT__CROP__ENABLED=True, INPUT__CROP__TYPE="absolute", INPUT__CROP__SIZE="(64, 64)",
        INPUT__MIN_SIZE_TEST=64, INPUT__MAX_SIZE_TEST=1000, MODEL__CATSEG__SLIDE_RESIZE="[64, 64]",
        SOLVER__IMS_PER_BATCH=4, SOLVER__BASE_LR=1e-3, SOLVER__MAX_ITER=iters, SOLVER__STEPS="()",
        SOLVER__WARMUP_ITERS=0, SOLVER__CHECKPOINT_PERIOD=100000, TEST__EVAL_PERIOD=0,
        SOLVER__CLIP_GRADIENTS__ENABLED=True, SOLVER__CLIP_GRADIENTS__CLIP_TYPE="full_model",
        SOLVER__CLIP_GRADIENTS__CLIP_VALUE=1.0, DATALOADER__NUM_WORKERS=0, OUTPUT_DIR=str(tmp_path / "out"), SEED=0)
    cfg = tiny_catseg_cfg(**{**opts, **overrides})
    path = tmp_path / "config.yaml"
    path.write_text(cfg.dump())
    return cfg, path


def _args(path, *extra):
    from detectron2.engine import default_argument_parser
    return default_argument_parser().parse_args(["--config-file", str(path), *extra])


def test_training_learns_and_resumes(tmp_path, dataset):
    train, val = dataset
    # a random tiny CLIP knows nothing (its text embeddings of the class names have cosines of 0.87-0.99): its
    # q / v projections must learn to tell the classes apart too, at the head's rate
    # BASE_LR 5e-3: at 1e-2 / 2e-2 some seeds never leave the all-negative plateau (loss ratio 0.99, mIoU 13-14),
    # and which ones changed with rounding-level changes of the head; at 5e-3 seeds 1, 2: loss x0.42 / x0.45
    _, path = _train_cfg(tmp_path, train, val, iters=160, SOLVER__CHECKPOINT_PERIOD=30, SOLVER__BASE_LR=5e-3,
                         MODEL__CATSEG__CLIP_LR_MULTIPLIER=1.0, SEED=1)
    before = train_net.main(_args(path, "--eval-only", "MODEL.ALLOW_RANDOM_WEIGHTS", "True"))[val]["sem_seg"]
    train_net.main(_args(path))
    out = tmp_path / "out"
    after = train_net.main(_args(path, "--eval-only", "MODEL.WEIGHTS", str(out / "model_final.pth")))[val]["sem_seg"]
    losses = [json.loads(ln)["total_loss"] for ln in (out / "metrics.json").read_text().splitlines()
              if "total_loss" in ln]
    assert sum(losses[-2:]) < 0.75 * sum(losses[:2]), losses
    assert after["mIoU"] > before["mIoU"] + 10, (before, after)  # measured: 2.7 -> 26.7

    # resume: from the iteration-29 checkpoint the run continues at 30, not 0
    (out / "last_checkpoint").write_text("model_0000029.pth")
    n_before = len((out / "metrics.json").read_text().splitlines())
    train_net.main(_args(path, "--resume", "SOLVER.MAX_ITER", "40"))
    new = [json.loads(ln) for ln in (out / "metrics.json").read_text().splitlines()[n_before:]]
    assert new and min(r["iteration"] for r in new) >= 30
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 39


def coloured_shapes(g: torch.Generator, n: int, size: int) -> torch.Tensor:
    """(n, 3, size, size) 0-255 images of random colours: a two-part background and 1-3 discs / boxes, noise."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.empty(n, 3, size, size)
    for img in images:
        horizon = int(torch.randint(size // 4, 3 * size // 4, (1,), generator=g))
        img[:] = (torch.rand(3, generator=g) * 255)[:, None, None]
        img[:, horizon:] = (torch.rand(3, generator=g) * 255)[:, None, None]
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            r = int(torch.randint(size // 10, size // 4, (1,), generator=g))
            cy, cx = (int(v) for v in torch.randint(0, size, (2,), generator=g))
            disc = torch.rand(1, generator=g) < 0.5
            inside = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if disc else \
                (((yy - cy).abs() <= r) & ((xx - cx).abs() <= r))
            img[:, inside] = (torch.rand(3, generator=g) * 255)[:, None]
    return (images + 12 * torch.randn(images.shape, generator=g)).clamp(0, 255)


def pretrain_on_colours(model, steps: int, seed: int) -> None:
    """A stand-in for CLIP's pre-training: every weight of the image tower is trained (AdamW) on random coloured
    shapes, none of the synthetic dataset's, so that a patch's dense embedding points at its mean colour, which is
    where `ColourText` puts a colour's name. The tower's trainable flags are restored afterwards."""
    g = torch.Generator().manual_seed(seed)
    params = list(model.backbone.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    for _ in range(steps):
        images = coloured_shapes(g, 16, model.clip_resolution[0])
        emb, _ = model.encode(model.normalize(images))  # (N, D, h, w)
        colour = F.avg_pool2d(images, model.backbone.patch_size) - 128.0  # (N, 3, h, w)
        target = F.pad(colour, (0, 0, 0, 0, 0, emb.shape[1] - 3))
        loss = 1 - F.cosine_similarity(emb, target, dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)
        p.grad = None
    assert loss.item() < 0.05, f"the stand-in pre-training did not converge (1 - cos = {loss.item():.3f})"


class ColourCLIPTrainer(train_net.Trainer):
    """CAT-Seg on a tiny CLIP that has seen colours and their names, as a real CLIP has seen objects and theirs: the
    stand-in text space `ColourText` and an image tower pre-trained into it (`pretrain_on_colours`)."""

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        model.text_classifier = ColourText(model.backbone.embed_dim, model.head.cost_embed.in_channels)
        pretrain_on_colours(model, steps=300, seed=cfg.SEED)
        return model


def test_held_out_class_is_segmented_by_its_name(tmp_path, dataset):
    """Zero-shot: "yellow circle" is in no training image nor the training vocabulary; after CAT-Seg's training (head
    + q / v of CLIP at the shipped 0.01 multiplier) only its name's embedding is added at test time, and its pixels are
    found through the cost volume. On an 8 x 8 feature grid (128 px): at the 4 x 4 grid of the other tests the shapes
    are smaller than a patch."""
    train, val = dataset
    res = "[128, 128]"
    cfg, _ = _train_cfg(tmp_path, train, val, iters=300, SOLVER__BASE_LR=2e-3, MODEL__CATSEG__CLIP_RESOLUTION=res,
                        MODEL__CATSEG__SLIDE_RESIZE=res, MODEL__CATSEG__SLIDE_WINDOW=128,
                        INPUT__MIN_SIZE_TRAIN="(128,)", INPUT__CROP__SIZE="(128, 128)", INPUT__MIN_SIZE_TEST=128)
    assert cfg.MODEL.CATSEG.CLIP_LR_MULTIPLIER == 0.01
    cfg.freeze()
    trainer = ColourCLIPTrainer(cfg)
    assert HELD_OUT[0] not in trainer.model.train_vocabulary.names
    trainer.train()
    result = ColourCLIPTrainer.test(cfg, trainer.model)[val]["sem_seg"]
    # chance: a uniform guess labels 1 / 6 of the class's pixels right. Measured over SEED 0-9: 77-87 % of its
    # pixels found, IoU 53-69 (at 150 iterations 0-90 %); without the stand-in pre-training (a random tower) 0-9 %
    assert result[f"ACC-{HELD_OUT[0]}"] > 100 / len(CATEGORIES) + 30, result
    assert result[f"IoU-{HELD_OUT[0]}"] > 25, result
    assert result["mIoU-unseen"] == pytest.approx(result[f"IoU-{HELD_OUT[0]}"])


def test_early_rejection_off_or_keeping_all_changes_nothing():
    image, text, guidance = head_inputs(7)
    off = small_head()(image, text, image, guidance)
    keep_all = small_head(reject_topk=7)(image, text, image, guidance)
    torch.testing.assert_close(keep_all, off, rtol=0, atol=0)


def test_early_rejection_keeps_each_cells_top_classes_and_equals_a_run_on_them():
    """SED's rule written out: per image, a class is kept if it is the top-k by CLIP cosine (best prompt) at some
    cell; the kept classes' logits are those of a run given only them, the others the lowest (-100)."""
    k, num_classes = 1, 7
    image, text, guidance = head_inputs(num_classes, seed=3)
    head = small_head(reject_topk=k)
    out = head(image, text, image, guidance)
    plain = small_head()
    for i in range(image.shape[0]):
        kept = set()
        for y, x in itertools.product(range(image.shape[2]), range(image.shape[3])):
            scores = [max(F.cosine_similarity(image[i, :, y, x], text[i, t, p], dim=0).item()
                          for p in range(text.shape[2])) for t in range(num_classes)]
            kept |= set(sorted(range(num_classes), key=lambda t: -scores[t])[:k])
        kept = sorted(kept)
        assert 0 < len(kept) < num_classes  # the case under test: some rejected
        rejected = [t for t in range(num_classes) if t not in kept]
        ref = plain(image[i:i + 1], text[i:i + 1, kept], image[i:i + 1], [g[i:i + 1] for g in guidance])[0]
        torch.testing.assert_close(out[i, kept], ref, **TOL)
        assert (out[i, rejected] == -100).all() and out[i, kept].min() > -100
