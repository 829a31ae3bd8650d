"""GroupViT: the straight-through assignment, the grouping block, both contrastive losses and the group-to-class
segmentation against written-out computations; the captioned-image formats and mapper; training through the engine
on synthetic captioned shapes, evaluated by the semantic evaluator."""
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ovseg.config import get_ovseg_cfg
from ovseg.data.captions import ImageCaptionMapper, NounExtractor, read_noun_vocabulary, register_caption_dataset
from ovseg.modeling.groupvit import (
    GroupingBlock,
    GroupViTEncoder,
    contrastive_loss,
    group_to_class_segmentation,
    multi_label_contrastive_loss,
    straight_through_assignment,
)


# ---------------------------------------------------------------------------------------------- assignment
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_hard_assignment_is_argmax_one_hot_with_the_softmax_gradient(tau):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)  # (B, G, N): assignment over the groups (dim 1)
    w = torch.randn(2, 5, 7)
    out = straight_through_assignment(logits, dim=1, tau=tau, gumbel=False, hard=True)
    (out * w).sum().backward()
    # forward: one-hot of the argmax over the groups, column by column
    for b in range(2):
        for n in range(7):
            best = max(range(5), key=lambda g: logits[b, g, n].item())
            assert [out[b, g, n].item() for g in range(5)] == [1.0 if g == best else 0.0 for g in range(5)]
    # backward: the softmax's, d/dl_g sum_h s_h w_h = s_g (w_g - sum_h s_h w_h) / tau
    s = (logits.detach() / tau).softmax(1)
    expected = s * (w - (s * w).sum(1, keepdim=True)) / tau
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_gumbel_assignment_is_the_argmax_of_the_noisy_logits():
    logits = torch.randn(3, 4, 6)
    torch.manual_seed(5)
    out = straight_through_assignment(logits, dim=1, tau=0.7, gumbel=True, hard=True)
    torch.manual_seed(5)
    noise = -torch.empty_like(logits).exponential_().log()  # Gumbel(0, 1) by inversion of Exp(1)
    assert torch.equal(out, F.one_hot(((logits + noise) / 0.7).argmax(1), 4).permute(0, 2, 1).float())
    soft = straight_through_assignment(logits, dim=1, gumbel=False, hard=False)
    assert torch.allclose(soft, logits.softmax(1))


def test_grouping_block_assigns_each_token_to_one_group_and_trains_its_assignment():
    torch.manual_seed(0)
    block = GroupingBlock(dim=16, out_dim=24, num_heads=2, num_group_tokens=6, num_output_groups=3).eval()
    x, tokens = torch.randn(2, 10, 16), torch.randn(2, 6, 16)
    out, soft = block(x, tokens)
    # the forward written out: mixed group tokens, hard assignment (argmax over groups), mean over count + 1
    xn = block.norm_x(x)
    groups = block.pre_assign(block.norm_mixed(block.mix_tokens(block.norm_tokens(tokens))), xn)
    logits = (block.q(groups) @ block.k(xn).transpose(1, 2)) / math.sqrt(16)  # (2, 3, 10)
    hard = F.one_hot(logits.argmax(1), 3).permute(0, 2, 1).float()
    new = block.proj((hard / (hard.sum(-1, keepdim=True) + 1)) @ block.v(xn)) + groups
    expected = block.reduction(new) + block.mlp(block.norm_new(new))
    assert out.shape == (2, 3, 24) and torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(soft, logits.softmax(1), atol=1e-5)
    # training (Gumbel noise, straight-through): the assignment's own projections get gradients
    block.train()
    out, _ = block(x, tokens)
    out.square().sum().backward()
    assert block.q.weight.grad.abs().sum() > 0 and block.k.weight.grad.abs().sum() > 0


def test_encoder_stages_chain_their_assignments():
    torch.manual_seed(0)
    enc = GroupViTEncoder(img_size=32, patch_size=8, embed_dim=16, depths=(1, 1, 1), num_heads=2,
                          num_group_tokens=(6, 3, 0), num_output_groups=(6, 3)).eval()
    tokens, assignments, grid = enc(torch.randn(2, 3, 48, 40))  # another grid than training's: positions resized
    assert grid == (6, 5) and tokens.shape == (2, 3, 16)
    assert [a.shape for a in assignments] == [(2, 6, 30), (2, 3, 6)]
    for a in assignments:  # a distribution over the groups for every token
        assert torch.allclose(a.sum(1), torch.ones(a.shape[0], a.shape[2]))


# ---------------------------------------------------------------------------------------------- losses
def _log_softmax_row(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def test_contrastive_loss_equals_a_hand_computation():
    torch.manual_seed(0)
    img, txt, scale = torch.randn(4, 5), torch.randn(4, 5), torch.tensor(math.log(10.0))
    loss = contrastive_loss(img, txt, scale)
    i, t = F.normalize(img, dim=-1).tolist(), F.normalize(txt, dim=-1).tolist()
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    li = sum(-_log_softmax_row([10 * dot(i[a], t[b]) for b in range(4)])[a] for a in range(4)) / 4
    lt = sum(-_log_softmax_row([10 * dot(t[a], i[b]) for b in range(4)])[a] for a in range(4)) / 4
    assert loss.item() == pytest.approx(0.5 * (li + lt), rel=1e-5)


def test_multi_label_contrastive_loss_equals_a_hand_computation():
    torch.manual_seed(1)
    B, K, scale = 3, 2, 200.0  # the scale is clamped to 100
    img, prompts = torch.randn(B, 6), torch.randn(B, K, 6)
    loss = multi_label_contrastive_loss(img, prompts, torch.tensor(math.log(scale)))
    i = F.normalize(img, dim=-1).tolist()
    p = [F.normalize(prompts[b, k], dim=0).tolist() for b in range(B) for k in range(K)]  # prompt j of image j // K
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    # image a: its K prompts are the positives, each with target 1/K
    li = 0.0
    for a in range(B):
        logp = _log_softmax_row([100 * dot(i[a], q) for q in p])
        li -= sum(logp[j] / K for j in range(B * K) if j // K == a)
    # prompt j: its image is the one positive
    lt = 0.0
    for j in range(B * K):
        lt -= _log_softmax_row([100 * dot(p[j], i[a]) for a in range(B)])[j // K]
    assert loss.item() == pytest.approx(0.5 * (li / B + lt / (B * K)), rel=1e-5)


# ---------------------------------------------------------------------------------------------- segmentation
def test_group_to_class_segmentation_follows_the_written_rule():
    # 2 x 2 patch grid, stage 1: 4 patches -> 3 groups, stage 2: 3 -> 2 groups; 3 classes in a 2-d space
    a1 = torch.tensor([[0.7, 0.1, 0.2, 0.6],  # (G1=3, N=4): column n = patch n's distribution over the groups
                       [0.2, 0.8, 0.1, 0.3],
                       [0.1, 0.1, 0.7, 0.1]])
    a2 = torch.tensor([[0.9, 0.2, 0.4],  # (G2=2, G1=3)
                       [0.1, 0.8, 0.6]])
    groups = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, 0.2]])
    image = torch.tensor([1.0, 1.0])
    scale = 5.0

    def expected(top_k, bg):
        # patch -> final group: sum over stage-1 groups of P(g1 | n) P(g2 | g1), argmax over g2
        pix_group = []
        for n in range(4):
            p = [sum(a1[g1, n].item() * a2[g2, g1].item() for g1 in range(3)) for g2 in range(2)]
            pix_group.append(max(range(2), key=lambda g: p[g]))
        cos = lambda a, b: float(F.cosine_similarity(a, b, dim=0))  # noqa: E731
        img_logit = [scale * cos(image, text[c]) for c in range(3)]
        kept = sorted(range(3), key=lambda c: -img_logit[c])[:top_k] if top_k else list(range(3))
        probs = []
        for g in range(2):
            logit = [scale * cos(groups[g], text[c]) for c in range(3)]
            full = [math.exp(v) / sum(math.exp(u) for u in logit) for v in logit]
            if top_k:
                z = sum(math.exp(logit[c]) for c in kept)
                full = [full[c] * (math.exp(logit[c]) / z if c in kept else 0.0) for c in range(3)]
            probs.append(full)
        scores = [[probs[pix_group[n]][c] for n in range(4)] for c in range(3)]
        if bg is None:
            return torch.tensor(scores).reshape(3, 2, 2)
        thr = min(bg, max(max(p) for p in probs))
        background = [1.0 if max(scores[c][n] for c in range(3)) < thr else 0.0 for n in range(4)]
        return torch.tensor([background] + scores).reshape(4, 2, 2)

    for top_k, bg in ((0, None), (2, None), (2, 0.9), (0, 0.3)):
        got = group_to_class_segmentation([a1, a2], groups, image, text, scale, (2, 2), (2, 2), top_k=top_k,
                                          bg_threshold=bg)
        assert torch.allclose(got, expected(top_k, bg), atol=1e-6), (top_k, bg)
    # a larger output: each pixel takes the group of the bilinearly resized assignment
    big = group_to_class_segmentation([a1, a2], groups, image, text, scale, (2, 2), (4, 4), top_k=0)
    assert big.shape == (3, 4, 4) and torch.allclose(big[:, ::3, ::3], expected(0, None), atol=1e-6)


# ---------------------------------------------------------------------------------------------- data
def test_noun_extractor_finds_vocabulary_nouns_as_whole_words():
    vocab = read_noun_vocabulary("traffic light, light, dog|puppy, cat, bus")
    extract = NounExtractor(vocab)
    assert extract("Two traffic lights, a PUPPY and buses; a category of dogs") == ["traffic light", "dog", "bus"]
    assert extract("a light over the concatenation") == ["light"]
    assert NounExtractor([])("a dog") == []


def _image(path, color=(200, 30, 30), size=(40, 30)):
    Image.fromarray(np.full((size[1], size[0], 3), color, np.uint8)).save(path)


def test_caption_formats_and_mapper(tmp_path):
    from detectron2.data import DatasetCatalog

    # COCO captions JSON (captions_train2017.json layout), images under <json folder>/images/
    (tmp_path / "coco" / "images").mkdir(parents=True)
    for i in (1, 2):
        _image(tmp_path / "coco" / "images" / f"{i:012d}.jpg")
    data = {"images": [{"id": 1, "file_name": "000000000001.jpg", "height": 30, "width": 40},
                       {"id": 2, "file_name": "000000000002.jpg", "height": 30, "width": 40},
                       {"id": 3, "file_name": "000000000003.jpg", "height": 30, "width": 40}],  # no caption: left out
            "annotations": [{"id": 9, "image_id": 1, "caption": "A dog on a bus."},
                            {"id": 10, "image_id": 1, "caption": "A puppy. "},
                            {"id": 11, "image_id": 2, "caption": "An empty road"}]}
    (tmp_path / "coco" / "captions.json").write_text(json.dumps(data))
    name = f"captions:{tmp_path / 'coco' / 'captions.json'}"
    register_caption_dataset(name)
    recs = DatasetCatalog.get(name)
    assert [(r["image_id"], r["captions"]) for r in recs] == [(1, ["A dog on a bus.", "A puppy."]),
                                                            (2, ["An empty road"])]
    # a folder of images with same-stem .txt captions (one per line); an image without one is skipped
    folder = tmp_path / "folder" / "sub"
    folder.mkdir(parents=True)
    _image(folder / "a.png")
    (folder / "a.txt").write_text("a cat\n\na red bus\n")
    _image(folder / "b.png")
    name = f"captions:{tmp_path / 'folder'}"
    register_caption_dataset(name)
    recs = DatasetCatalog.get(name)
    assert [(r["image_id"], r["captions"]) for r in recs] == [("sub/a", ["a cat", "a red bus"])]
    with pytest.raises(ValueError, match="not a COCO captions JSON"):
        (tmp_path / "bad.json").write_text("{}")
        register_caption_dataset(f"captions:{tmp_path / 'bad.json'}")
        DatasetCatalog.get(f"captions:{tmp_path / 'bad.json'}")

    cfg = get_ovseg_cfg()
    cfg.INPUT.CAPTIONS.IMAGE_SIZE = 16
    cfg.INPUT.CAPTIONS.NOUN_VOCABULARY = "cat, bus, dog"
    mapper = ImageCaptionMapper(cfg, True)
    random.seed(0)
    seen = set()
    for _ in range(20):
        out = mapper(recs[0])
        assert out["image"].shape == (3, 16, 16)
        assert out["nouns"] == {"a cat": ["cat"], "a red bus": ["bus"]}[out["caption"]]
        seen.add(out["caption"])
    assert seen == {"a cat", "a red bus"}  # one caption drawn per sample


def test_prompts_pad_with_the_caption():
    from ovseg.modeling.meta_arch.groupvit import GroupViTSegmentor

    model = GroupViTSegmentor.__new__(GroupViTSegmentor)
    model.multi_label, model.noun_templates = 3, ("a photo of a {}.", "art of the {}.")
    random.seed(0)
    prompts = model.prompts_for("a red square", ["red"])
    assert prompts[0] in ("a photo of a red.", "art of the red.") and prompts[1:] == ["a red square"] * 2
    prompts = model.prompts_for("c", ["a", "b", "c", "d"])
    assert len(prompts) == 3 and len({p.split()[-1] for p in prompts}) == 3  # drawn without repetition


# ---------------------------------------------------------------------------------------------- training
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def _split_image(rng, size=32):
    """Two colours of `COLORS` on either side of a random vertical or horizontal cut (+ noise), its label map and
    its caption naming both colours."""
    names = list(COLORS)
    a, b = rng.choice(len(names), 2, replace=False)
    cut = int(rng.integers(size // 4, 3 * size // 4 + 1))
    img = rng.normal(0, 10, (size, size, 3))
    lab = np.empty((size, size), np.uint8)
    img[:, :cut] += COLORS[names[a]]
    img[:, cut:] += COLORS[names[b]]
    lab[:, :cut], lab[:, cut:] = a, b
    if rng.random() < 0.5:
        img, lab = img.transpose(1, 0, 2), lab.T
    return np.ascontiguousarray(img.clip(0, 255).astype(np.uint8)), np.ascontiguousarray(lab), \
        f"a {names[a]} and a {names[b]}"


def _synthetic_data(root, n_train=256, n_val=24):
    rng = np.random.default_rng(0)
    train = root / "train"
    train.mkdir(parents=True)
    for i in range(n_train):
        img, _, caption = _split_image(rng)
        Image.fromarray(img).save(train / f"{i:04d}.png")
        (train / f"{i:04d}.txt").write_text(caption + "\n")
    val = root / "val"
    (val / "images").mkdir(parents=True)
    (val / "labels").mkdir()
    (val / "classes.txt").write_text("\n".join(COLORS) + "\n")
    labels = []
    for i in range(n_val):
        img, lab, _ = _split_image(rng)
        Image.fromarray(img).save(val / "images" / f"{i:04d}.png")
        Image.fromarray(lab).save(val / "labels" / f"{i:04d}.png")
        labels.append(lab)
    return f"captions:{train}", f"folder:{val}", np.stack(labels)


def test_segmentation_emerges_from_captions_through_the_engine(tmp_path):
    """Trained with train_net's engine on captions alone ("a red and a blue"), the grouping assigns held-out pixels
    to the right colours above chance, as measured by the semantic evaluator; the losses fall on the way."""
    from ovseg import engine

    train, val, labels = _synthetic_data(tmp_path / "data")
    cfg = get_ovseg_cfg()
    opts = {
        "MODEL.META_ARCHITECTURE": "GroupViTSegmentor", "MODEL.DEVICE": "cpu",
        "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53], "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
        "MODEL.TEXT.TEMPLATES": "single",
        "MODEL.GROUPVIT.PATCH_SIZE": 4, "MODEL.GROUPVIT.EMBED_DIM": 32, "MODEL.GROUPVIT.DEPTHS": [1, 1],
        "MODEL.GROUPVIT.NUM_HEADS": 2, "MODEL.GROUPVIT.NUM_GROUP_TOKENS": [4, 0],
        "MODEL.GROUPVIT.NUM_OUTPUT_GROUPS": [4], "MODEL.GROUPVIT.DROP_PATH_RATE": 0.0,
        "MODEL.GROUPVIT.TEXT_CONTEXT_LENGTH": 8, "MODEL.GROUPVIT.TEXT_WIDTH": 16, "MODEL.GROUPVIT.TEXT_LAYERS": 1,
        "MODEL.GROUPVIT.TEXT_HEADS": 1, "MODEL.GROUPVIT.PROJ_HIDDEN_DIM": 64, "MODEL.GROUPVIT.PROJ_DIM": 16,
        "MODEL.GROUPVIT.MULTI_LABEL": 2, "MODEL.GROUPVIT.NOUN_TEMPLATES": "single",
        "MODEL.GROUPVIT.BG_THRESHOLD": 0.0,
        "INPUT.DATASET_MAPPER_NAME": "image_caption", "INPUT.CAPTIONS.IMAGE_SIZE": 32,
        "INPUT.CAPTIONS.CROP_SCALE": [1.0, 1.0], "INPUT.CAPTIONS.NOUN_VOCABULARY": ",".join(COLORS),
        "INPUT.MIN_SIZE_TEST": 32, "INPUT.MAX_SIZE_TEST": 32,
        "DATASETS.TRAIN": (train,), "DATASETS.TEST": (), "DATALOADER.NUM_WORKERS": 0,
        "SOLVER.IMS_PER_BATCH": 16, "SOLVER.BASE_LR": 2e-3, "SOLVER.WEIGHT_DECAY": 0.05, "SOLVER.MAX_ITER": 250,
        "SOLVER.LR_SCHEDULER_NAME": "WarmupCosineLR", "SOLVER.WARMUP_ITERS": 10, "SOLVER.STEPS": (),
        "SOLVER.BACKBONE_MULTIPLIER": 1.0, "SOLVER.CHECKPOINT_PERIOD": 100000, "TEST.EVAL_PERIOD": 0,
        "OUTPUT_DIR": str(tmp_path / "out"), "SEED": 0,
    }
    for k, v in opts.items():
        node = cfg
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    path = tmp_path / "config.yaml"
    path.write_text(cfg.dump())
    engine.main(engine.default_argument_parser().parse_args(["--config-file", str(path)]))
    out = tmp_path / "out"
    evaluate = engine.default_argument_parser().parse_args(
        ["--config-file", str(path), "--eval-only", "MODEL.WEIGHTS", str(out / "model_final.pth"),
         "DATASETS.TEST", f"('{val}',)"])
    results = engine.main(evaluate)[val]["sem_seg"]

    # the losses fell (detectron2's metrics.json: the first and last logged values)
    logs = [json.loads(ln) for ln in (out / "metrics.json").read_text().splitlines()]
    logs = [r for r in logs if "loss_contrastive" in r]
    for key in ("loss_contrastive", "loss_multi_label"):
        assert logs[-1][key] < 0.8 * logs[0][key], (key, logs[0][key], logs[-1][key])
    # chance: the best single colour for every pixel, and a uniformly random colour (1/4)
    best_constant = max((labels == c).mean() for c in range(len(COLORS)))
    assert results["pACC"] / 100 > max(best_constant, 0.25) + 0.05, (results, best_constant)
    assert results["mIoU"] / 100 > 0.2, results  # a random colour per pixel: IoU about 1/7 per class


# ---------------------------------------------------------------------------------------------- sliding windows
def _tiny_segmentor(**test):
    """A tiny random GroupViTSegmentor (patch 4) in eval mode, its MODEL.GROUPVIT.TEST keys set from `test`."""
    from detectron2.modeling import build_model

    cfg = get_ovseg_cfg()
    g = cfg.MODEL.GROUPVIT
    cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.DEVICE, cfg.MODEL.TEXT.TEMPLATES = "GroupViTSegmentor", "cpu", "single"
    g.PATCH_SIZE, g.EMBED_DIM, g.DEPTHS, g.NUM_HEADS = 4, 32, [1, 1], 2
    g.NUM_GROUP_TOKENS, g.NUM_OUTPUT_GROUPS, g.DROP_PATH_RATE = [4, 0], [4], 0.0
    g.TEXT_CONTEXT_LENGTH, g.TEXT_WIDTH, g.TEXT_LAYERS, g.TEXT_HEADS = 8, 16, 1, 1
    g.PROJ_HIDDEN_DIM, g.PROJ_DIM, g.TOP_K_CLASSES, g.BG_THRESHOLD = 64, 16, 2, 0.5
    cfg.INPUT.CAPTIONS.IMAGE_SIZE = 16
    for k, v in test.items():
        g.TEST[k] = v
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model.set_vocabulary("background,red,green,blue")  # the background rule and top-k act in every window
    return model


def test_one_window_covering_the_image_equals_whole_image_inference():
    model = _tiny_segmentor(MODE="whole")
    image = torch.rand(3, 42, 54) * 255  # not a multiple of the patch: padded alike
    whole = model([{"image": image}])[0]["sem_seg"]
    assert whole.shape == (4, 42, 54)
    model.test_mode, model.window_stride = "slide", 16
    for window in (54, 448):  # as large as the image, and larger (shrunk to it)
        model.window_size = window
        assert torch.equal(model([{"image": image}])[0]["sem_seg"], whole), window


def test_overlapping_windows_average_as_written_out():
    model = _tiny_segmentor(MODE="slide", WINDOW_SIZE=24, STRIDE=16)
    image = torch.rand(3, 36, 44) * 255
    got = model([{"image": image}])[0]["sem_seg"]
    # mmseg's windows for 36 x 44, crop 24, stride 16: offsets every 16, the last flush with the border
    ys, xs = [0, 12], [0, 16, 20]
    norm = model.normalize(image)
    with torch.no_grad():
        text = model.class_embeddings(model.vocabulary)
        background = model.vocabulary.names.index("background")
        total, count = torch.zeros(4, 36, 44), torch.zeros(36, 44)
        for y in ys:
            for x in xs:
                total[:, y:y + 24, x:x + 24] += model.segment(norm[None, :, y:y + 24, x:x + 24], text, background)
                count[y:y + 24, x:x + 24] += 1
    assert count.min() == 1 and count.max() == 6
    torch.testing.assert_close(got, total / count)
    # a window's own rules differ from the whole image's: the windows are really segmented apart
    model.test_mode = "whole"
    assert not torch.allclose(got, model([{"image": image}])[0]["sem_seg"])

    with pytest.raises(ValueError, match="MODEL.GROUPVIT.TEST.MODE"):
        _tiny_segmentor(MODE="tiles")
