"""CLIPSelfDistiller: loss against open_clip itself, training through train_net's Trainer, export/import."""
import random

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from PIL import Image

from ovseg.data.clipself_mapper import CLIPSelfDatasetMapper
from ovseg.modeling import load_open_clip, pool_boxes, split_clip
from ovseg.modeling.backbone import CLIPViTDenseEncoder
from ovseg.modeling.meta_arch import save_open_clip_checkpoint
from tests.helpers import TINY_MODELS, tiny_cfg


def _cfg(tmp_path, name, **kw):
    opts = dict(MODEL__META_ARCHITECTURE="CLIPSelfDistiller", MODEL__CLIP__MODEL_NAME=name,
                MODEL__CLIP__UNLOCK_LAST_BLOCKS=1, INPUT__DATASET_MAPPER_NAME="clipself",
                INPUT__CLIPSELF__CROP_SIZE=64, INPUT__CLIPSELF__SIZES=[64, 80], INPUT__CLIPSELF__MAX_REGIONS=8,
                OUTPUT_DIR=str(tmp_path / "out"), DATALOADER__NUM_WORKERS=0, SOLVER__IMS_PER_BATCH=2)
    opts.update(kw)
    return tiny_cfg(**opts)


def _image_folder(root, n=4):
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        # smooth random images: coloured blocks, so that crops differ in content
        small = rng.integers(0, 256, size=(4, 6, 3)).astype(np.uint8)
        Image.fromarray(small).resize((90 + 10 * i, 64), Image.BILINEAR).save(root / f"{i}.png")
    return str(root)


def _batch(cfg, folder, seed=0):
    random.seed(seed)
    mapper = CLIPSelfDatasetMapper(cfg, True)
    return [mapper({"file_name": f"{folder}/{i}.png", "image_id": i}) for i in range(2)]


@pytest.mark.parametrize("name", TINY_MODELS)
def test_loss_matches_open_clip_teacher(tmp_path, name):
    cfg = _cfg(tmp_path, name)
    folder = _image_folder(tmp_path / "imgs")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    torch.manual_seed(0)
    reference = load_open_clip(name, "")  # the same random weights, untouched by ovseg
    batch = _batch(cfg, folder)
    loss = model(batch)["loss_clipself"]

    mean, std = model.pixel_mean, model.pixel_std
    with torch.no_grad():
        crops = torch.cat([b["crops"] for b in batch]).float()
        teacher = F.normalize(reference.encode_image((crops - mean) / std), dim=-1)  # open_clip's own embedding
        student = []
        # the batch is zero-padded (after normalisation) to a common size, a multiple of the patch
        hp = max(b["image"].shape[1] for b in batch) + 15 & ~15
        wp = max(b["image"].shape[2] for b in batch) + 15 & ~15
        for b in batch:
            x = ((b["image"].float() - mean) / std)[None]
            x = F.pad(x, (0, wp - x.shape[-1], 0, hp - x.shape[-2]))
            dense = model.backbone(x)["clip_dense"]
            student.append(F.normalize(pool_boxes(dense, [b["region_boxes"]], 16), dim=-1))
        student = torch.cat(student)
    ref = (1 - (student * teacher).sum(-1)).mean()
    torch.testing.assert_close(loss.detach(), ref, atol=1e-5, rtol=1e-5)
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith("backbone.") for n in grads)
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())


def test_empty_regions_give_zero_loss(tmp_path):
    cfg = _cfg(tmp_path, TINY_MODELS[0])
    model = build_model(cfg).train()
    batch = [{"image": torch.zeros(3, 32, 48), "region_boxes": torch.zeros(0, 4),
              "crops": torch.zeros(0, 3, 64, 64, dtype=torch.uint8)}]
    loss = model(batch)["loss_clipself"]
    assert loss.item() == 0.0
    loss.backward()
    bad = dict(batch[0], crops=torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="crops"):
        model([bad])
    with pytest.raises(ValueError, match="region_boxes"):
        model([{"image": torch.zeros(3, 32, 32)}])


@pytest.mark.parametrize("name", TINY_MODELS)
def test_training_through_train_net(tmp_path, name):
    """A few dozen iterations with train_net's Trainer: the loss on a fixed batch drops, the teacher stays
    bit-identical, only the unlocked block of the student moves; then export -> load round trips."""
    from ovseg import engine as train_net

    folder = _image_folder(tmp_path / "imgs")
    cfg = _cfg(tmp_path, name, SOLVER__MAX_ITER=30, SOLVER__BASE_LR=1e-3, SOLVER__WARMUP_ITERS=0,
               SOLVER__STEPS=[], SOLVER__CHECKPOINT_PERIOD=1000, SOLVER__WEIGHT_DECAY=0.1)
    cfg.DATASETS.TRAIN = (folder,)
    cfg.DATASETS.TEST = ()
    torch.manual_seed(0)
    trainer = train_net.Trainer(cfg)
    model = trainer.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fixed = _batch(cfg, folder, seed=123)
    with torch.no_grad():
        loss_before = model(fixed)["loss_clipself"].item()

    # optimizer: only unlocked student parameters; no decay on vectors (norms, biases)
    groups = trainer.optimizer.param_groups
    ids = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            n = ids[id(p)]
            assert n.startswith("backbone.") and p.requires_grad
            assert g["weight_decay"] == (0.1 if p.ndim >= 2 else 0.0), n

    trainer.train()
    with torch.no_grad():
        loss_after = model(fixed)["loss_clipself"].item()
    assert loss_after < loss_before - 0.01, (loss_before, loss_after)

    after = model.state_dict()
    last = len(model.backbone.tower.blocks) - 1
    block_prefix = ("backbone.tower.visual.transformer.resblocks." if "ViT" in name
                    else "backbone.tower.visual.trunk.blocks.") + f"{last}."
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(block_prefix) for k in changed), sorted(changed)[:5]
    for k in before:  # teacher and text tower bit-identical
        if k.startswith(("teacher.", "text_classifier.")):
            assert torch.equal(before[k], after[k]), k

    # export -> MODEL.CLIP.PRETRAINED round trip, and the training checkpoint itself loads too
    model.eval()
    path = save_open_clip_checkpoint(model, str(tmp_path / "refined.pt"))
    x = torch.randn(2, 3, 48, 80)
    tokens = open_clip.get_tokenizer(name)(["a cat", "a sofa"])
    with torch.no_grad():
        ref_dense = model.backbone(x)
        ref_image = model.backbone.encode_image(x)
        ref_text = model.text_classifier.text_model.encode_text(tokens)
    for file in (path, str(tmp_path / "out" / "model_final.pth")):
        # frozen like the distiller's copy: nn.MultiheadAttention takes a different (fused) kernel when no
        # parameter requires grad, which changes the last bits
        loaded = load_open_clip(name, file).requires_grad_(False)
        with torch.no_grad():
            text = loaded.encode_text(tokens)
            visual, _ = split_clip(loaded)
            enc = CLIPViTDenseEncoder(visual=visual, feature_blocks=model.backbone.feature_blocks,
                                      unlock_last_blocks=model.backbone.unlock_last_blocks)
            dense, image = enc(x), enc.encode_image(x)
        assert all(torch.equal(dense[k], ref_dense[k]) for k in ref_dense)
        assert torch.equal(image, ref_image) and torch.equal(text, ref_text)

    # the refined weights in MODEL.CLIP.PRETRAINED feed the training-free segmentor
    seg = build_model(tiny_cfg(MODEL__CLIP__MODEL_NAME=name, MODEL__CLIP__PRETRAINED=path,
                               MODEL__TEXT__VOCABULARY="cat,sofa")).eval()
    with torch.no_grad():
        assert torch.equal(seg.backbone(x)["clip_dense"], ref_dense["clip_dense"])
