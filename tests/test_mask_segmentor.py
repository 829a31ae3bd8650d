"""OpenVocabMaskSegmentor end to end on the tiny CLIP: shapes, gradients, vocabulary switching, bad input,
the pixel decoder's pyramid, the data mappers and train_net's optimizer / evaluator wiring."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOPanopticEvaluator, SemSegEvaluator
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import BitMasks, Instances
from PIL import Image

from ovseg import engine as train_net
from ovseg.data.image_io import rgb2id
from ovseg.data.mappers import MaskPanopticLSJMapper, MaskSemanticMapper
from ovseg.modeling.postprocessing import instance_inference, panoptic_inference
from ovseg.modeling.transformer_decoder.masked_attention import attend
from tests.synthetic_panoptic import make_dataset
from tests.tiny_mask import tiny_mask_cfg

VOCAB = "red circle,green square,sky"
TRAIN_VOCAB = "red circle|ball,green square"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = tiny_mask_cfg(MODEL__TEXT__VOCABULARY=VOCAB, MODEL__MASK_SEG__TRAIN_VOCABULARY=TRAIN_VOCAB,
                        MODEL__MASK_SEG__TEST__INSTANCE_ON=True, MODEL__MASK_SEG__TEST__OBJECT_MASK_THRESHOLD=0.0,
                        MODEL__MASK_SEG__TEST__OVERLAP_THRESHOLD=0.0)
    return build_model(cfg)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=6, n_val=3, prefix="synth_pan_unit")


def _instances(h, w):
    inst = Instances((h, w))
    inst.gt_classes = torch.tensor([0, 1])
    m = torch.zeros(2, h, w, dtype=torch.bool)
    m[0, : h // 2], m[1, h // 2:, : w // 2] = True, True
    inst.gt_masks = BitMasks(m)
    return inst


def test_training_losses_and_gradients(model):
    model.train()
    batch = [{"image": torch.rand(3, 96, 80) * 255, "instances": _instances(96, 80)},
             {"image": torch.rand(3, 64, 72) * 255, "instances": _instances(64, 72)[:0]}]  # one without segments
    losses = model(batch)
    layers = len(model.transformer_decoder.layers)
    assert len(losses) == 3 * (layers + 1) and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.backbone.parameters())  # frozen CLIP
    assert all(p.grad is None for p in model.text_classifier.parameters())
    for part in (model.pixel_decoder, model.transformer_decoder, model.in_vocab):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), type(part).__name__
        assert sum(g.abs().sum() for g in grads) > 0
    model.zero_grad()
    model.eval()


def test_inference_outputs(model):
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 70, 90) * 255, "height": 35, "width": 45},
                     {"image": torch.rand(3, 48, 48) * 255}])
    assert out[0]["sem_seg"].shape == (3, 35, 45) and out[1]["sem_seg"].shape == (3, 48, 48)
    pan, segments = out[0]["panoptic_seg"]
    assert pan.shape == (35, 45)
    assert {s["id"] for s in segments} == set(pan.unique().tolist()) - {0}
    inst = out[0]["instances"]
    assert inst.image_size == (35, 45) and len(inst) > 0
    assert inst.pred_classes.max() < 3


@pytest.mark.parametrize("semantic_resolution", ["mask", "output", "padded"])
def test_inference_equals_full_resolution_reference(model, semantic_resolution):
    """The inference shortcuts (decoder masks kept at the attended level's size, per-query output masks on
    demand, semantic scores combined on the mask grid) against the plain computation: every decoder layer's
    masks at full size, all query masks through detectron2's `sem_seg_postprocess`."""
    batch = [{"image": torch.rand(3, 70, 90) * 255, "height": 35, "width": 45},
             {"image": torch.rand(3, 48, 64) * 255}]  # padded into one batch
    model.eval()
    default, model.semantic_resolution = model.semantic_resolution, semantic_resolution
    dec = model.transformer_decoder
    void = model.in_vocab.void_embedding.detach().clone()
    try:
        with torch.no_grad():
            # untrained, every query resembles the void embedding; a zero one (logit 0) lets classes win somewhere
            model.in_vocab.void_embedding.zero_()
            out = model(batch)
            images = model.preprocess(batch)
            feats = model.encode(images.tensor)
            dec.train()  # the training path: full-size masks of every layer, resized for the attention masks
            ref = dec(*reversed(model.pixel_decoder(feats)))
            dec.eval()
            probs = model.class_probabilities(ref["pred_embeds"], ref["pred_masks"], feats["clip_dense"],
                                              images, model.text_embeddings(model.vocabulary))
            padded = F.interpolate(ref["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear",
                                   align_corners=False)
    finally:
        dec.eval()
        model.semantic_resolution = default
        with torch.no_grad():
            model.in_vocab.void_embedding.copy_(void)
    blocked = 0
    for i, inp in enumerate(batch):
        size, out_size = images.image_sizes[i], (inp.get("height", 70 if i == 0 else 48), inp.get("width", 64))
        masks = sem_seg_postprocess(padded[i], size, *out_size).sigmoid()
        if semantic_resolution == "output":
            sem = torch.einsum("qk,qhw->khw", probs[i, :, :-1], masks)
        elif semantic_resolution == "padded":  # FC-CLIP's semantic-only path
            sem = sem_seg_postprocess(torch.einsum("qk,qhw->khw", probs[i, :, :-1], padded[i].sigmoid()), size,
                                      *out_size)
        else:
            grid = torch.einsum("qk,qhw->khw", probs[i, :, :-1], ref["pred_masks"][i].sigmoid())
            sem = sem_seg_postprocess(F.interpolate(grid[None], size=images.tensor.shape[-2:], mode="bilinear",
                                                    align_corners=False)[0], size, *out_size)
        torch.testing.assert_close(out[i]["sem_seg"], sem, rtol=1e-4, atol=1e-5)
        pan, segments = panoptic_inference(probs[i], masks, model.is_thing, 0.0, 0.0)
        assert torch.equal(out[i]["panoptic_seg"][0], pan) and out[i]["panoptic_seg"][1] == segments
        inst = instance_inference(probs[i], masks, model.is_thing)
        assert torch.equal(out[i]["instances"].pred_masks, inst.pred_masks)
        torch.testing.assert_close(out[i]["instances"].scores, inst.scores)
        blocked += len(segments)
    assert blocked > 0  # the panoptic comparison compared segments


def test_attend_equals_multihead_attention_with_per_head_masks():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    allowed = torch.rand(2, 5, 7) > 0.4
    allowed[..., 0] = True  # every query sees something
    ref = mha(q, kv, kv, attn_mask=~allowed.repeat_interleave(4, dim=0), need_weights=False)[0]
    torch.testing.assert_close(attend(mha, q, kv, kv, allowed[:, None]), ref)
    torch.testing.assert_close(attend(mha, q, kv, kv), mha(q, kv, kv, need_weights=False)[0])


def test_vocabulary_switch_and_seen_classes(model):
    image = [{"image": torch.rand(3, 64, 64) * 255}]
    with torch.no_grad():
        model.set_vocabulary("Red Circle,yellow circle,sky,tree,car")
        assert model([*image])[0]["sem_seg"].shape[0] == 5
        # seen = named in the training vocabulary (any synonym, case-insensitive)
        assert model.seen.tolist() == [True, False, False, False, False]
        model.set_vocabulary("ball,green square")
        assert model.seen.tolist() == [True, True]
        assert model([*image])[0]["sem_seg"].shape[0] == 2
        model.set_vocabulary(VOCAB)
    with pytest.raises(ValueError, match="empty"):
        model.set_vocabulary("")
    with pytest.raises(ValueError, match="empty"):
        model.set_vocabulary([])


def test_vocabulary_from_dataset_metadata(model, dataset):
    _, val = dataset
    vocab = model.set_vocabulary(val)
    assert vocab.names == MetadataCatalog.get(val).vocabulary
    assert model.is_thing.tolist() == [False, False, True, True, True, True]
    model.set_vocabulary(VOCAB)


def test_image_smaller_than_patch_is_refused(model):
    with pytest.raises(ValueError, match="smaller than the CLIP patch size 16"):
        model([{"image": torch.rand(3, 12, 40) * 255}])
    with pytest.raises(ValueError, match="RGB"):
        model([{"image": torch.rand(1, 32, 32) * 255}])


def test_unregistered_dataset_is_a_clear_error():
    with pytest.raises(KeyError, match="DATASETS.TRAIN names dataset 'coco_2017_nope'"):
        build_model(tiny_mask_cfg(DATASETS__TRAIN="('coco_2017_nope',)"))
    with pytest.raises(KeyError, match="DATASETS.TEST"):
        build_model(tiny_mask_cfg(DATASETS__TEST="('ade_missing',)", MODEL__TEXT__VOCABULARY=""))


def test_bad_config_values_are_clear_errors():
    with pytest.raises(ValueError, match="not backbone outputs"):
        build_model(tiny_mask_cfg(MODEL__MASK_SEG__PIXEL_DECODER__IN_FEATURES=["res2", "res2", "res3", "res5"]))
    with pytest.raises(ValueError, match="NUM_LEVELS=4, but the pixel decoder has only 3"):
        build_model(tiny_mask_cfg(MODEL__MASK_SEG__DECODER__NUM_LEVELS=4))
    with pytest.raises(ValueError, match="INPUT.DATASET_MAPPER_NAME='mask_nope'; known mappers"):
        train_net.build_mapper(tiny_mask_cfg(INPUT__DATASET_MAPPER_NAME="mask_nope"), is_train=True)


def test_pixel_decoder_pyramid_shapes(model):
    feats = {"res2": torch.randn(1, 64, 5, 7), "res3": torch.randn(1, 64, 5, 7)}  # grid of an 80x112 input
    mask_features, levels = model.pixel_decoder(feats)
    assert mask_features.shape == (1, 32, 20, 28)
    assert [tuple(x.shape[-2:]) for x in levels] == [(3, 4), (5, 7), (10, 14)]  # coarsest first, ceil at /2
    assert model.pixel_decoder.strides == [4.0, 8.0, 16.0, 32.0]


@pytest.mark.parametrize("training", [True, False])
def test_decoder_with_empty_masks_stays_finite(model, training):
    dec = model.transformer_decoder
    levels = [torch.randn(1, 32, 3, 4), torch.randn(1, 32, 5, 7), torch.randn(1, 32, 10, 14)]
    mask_features = torch.randn(1, 32, 20, 28)
    was_training = dec.training
    with torch.no_grad():
        saved = dec.mask_embed[-1].bias.clone(), dec.mask_embed[-1].weight.clone()
        dec.mask_embed[-1].weight.zero_()
        dec.mask_embed[-1].bias.fill_(-10.0)  # every mask logit negative -> every attention mask all-blocked
        dec.train(training)
        out = dec(levels, mask_features - mask_features.min() + 1)
        dec.train(was_training)
        dec.mask_embed[-1].bias.copy_(saved[0])
        dec.mask_embed[-1].weight.copy_(saved[1])
    assert torch.isfinite(out["pred_embeds"]).all() and torch.isfinite(out["pred_masks"]).all()
    assert len(out["aux_outputs"]) == (len(dec.layers) if training else 0)  # deep supervision: training only


def test_panoptic_mapper_targets_match_png(dataset):
    train, _ = dataset
    cfg = tiny_mask_cfg(DATASETS__TRAIN=f"('{train}',)", INPUT__IMAGE_SIZE=96, INPUT__MIN_SCALE=1.0,
                        INPUT__MAX_SCALE=1.0, INPUT__RANDOM_FLIP="none")
    mapper = MaskPanopticLSJMapper(cfg, True)
    record = DatasetCatalog.get(train)[0]
    out = mapper(record)
    pan = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB")))
    assert out["image"].shape == (3, 96, 96)
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [s["category_id"] for s in record["segments_info"]]
    for m, s in zip(inst.gt_masks.tensor, record["segments_info"]):
        assert torch.equal(m, torch.from_numpy(pan == s["id"]))


def test_semantic_mapper_class_balanced_crop(dataset):
    train, _ = dataset
    cfg = tiny_mask_cfg(DATASETS__TRAIN=f"('{train}',)", INPUT__MIN_SIZE_TRAIN=(96,), INPUT__MAX_SIZE_TRAIN=96,
                        INPUT__CROP__ENABLED=True, INPUT__CROP__TYPE="absolute", INPUT__CROP__SIZE=(48, 48),
                        INPUT__CROP__SINGLE_CATEGORY_MAX_AREA=0.75)
    mapper = MaskSemanticMapper(cfg, True)
    for record in DatasetCatalog.get(train)[:4]:
        out = mapper(record)
        sem = out["sem_seg"]
        assert out["image"].shape == (3, 48, 48) and sem.shape == (48, 48)
        inst = out["instances"]
        assert sorted(inst.gt_classes.tolist()) == sorted(set(sem.unique().tolist()) - {255})
        for c, m in zip(inst.gt_classes, inst.gt_masks.tensor):
            assert torch.equal(m, sem == c)


def test_optimizer_groups_backbone_multiplier_and_full_model_clipping():
    cfg = tiny_mask_cfg(MODEL__TEXT__VOCABULARY="a,b", MODEL__CLIP__UNLOCK_LAST_BLOCKS=1,
                        SOLVER__BASE_LR=1e-3, SOLVER__BACKBONE_MULTIPLIER=0.1, SOLVER__WEIGHT_DECAY=0.05,
                        SOLVER__CLIP_GRADIENTS__ENABLED=True, SOLVER__CLIP_GRADIENTS__CLIP_TYPE="full_model",
                        SOLVER__CLIP_GRADIENTS__CLIP_VALUE=0.5)
    m = build_model(cfg)
    opt = train_net.Trainer.build_optimizer(cfg, m)
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in m.named_parameters():
        if not p.requires_grad:
            assert id(p) not in lr, name
        elif name.startswith("backbone."):
            assert lr[id(p)] == pytest.approx(1e-4), name
        else:
            assert lr[id(p)] == pytest.approx(1e-3), name
    assert any(n.startswith("backbone.") for n, p in m.named_parameters() if id(p) in lr)
    assert wd[id(m.transformer_decoder.query_feat.weight)] == 0.0
    assert wd[id(m.transformer_decoder.norm.weight)] == 0.0
    assert wd[id(m.transformer_decoder.class_embed[0].weight)] == 0.05

    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.ones_like(p)
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    opt.step()
    after = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    torch.testing.assert_close(after, torch.tensor(0.5), rtol=1e-4, atol=1e-5)  # one norm for the whole model
    assert total > 0.5

    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.0
    opt = train_net.Trainer.build_optimizer(cfg, m)
    kept = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in kept for p in m.backbone.parameters())


def _fcclip_weight_decay(model, wd, wd_norm, wd_embed):
    """FC-CLIP's train_net.py rule, written out: per module, norm layers -> wd_norm, nn.Embedding -> wd_embed,
    the rest (biases and logit scales included) -> wd. ovseg's void embedding is FC-CLIP's nn.Embedding(1, D)."""
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    out = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if isinstance(module, norms):
                out[id(p)] = wd_norm
            elif isinstance(module, torch.nn.Embedding) or name == "void_embedding":
                out[id(p)] = wd_embed
            else:
                out[id(p)] = wd
    return out


def test_weight_decay_rules():
    cfg = tiny_mask_cfg(MODEL__TEXT__VOCABULARY="a,b", SOLVER__WEIGHT_DECAY=0.05, SOLVER__WEIGHT_DECAY_NORM=0.01,
                        SOLVER__WEIGHT_DECAY_EMBED=0.02, SOLVER__WEIGHT_DECAY_RULE="fcclip",
                        SOLVER__CLIP_GRADIENTS__ENABLED=False)
    m = build_model(cfg)
    opt = train_net.Trainer.build_optimizer(cfg, m)
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd == _fcclip_weight_decay(m, 0.05, 0.01, 0.02)
    assert wd[id(m.in_vocab.log_scale)] == 0.05 and wd[id(m.transformer_decoder.class_embed[0].bias)] == 0.05

    cfg.SOLVER.WEIGHT_DECAY_RULE = "ndim"  # open_clip's: every vector exempt
    wd = {id(p): g["weight_decay"] for g in train_net.Trainer.build_optimizer(cfg, m).param_groups
          for p in g["params"]}
    assert wd[id(m.in_vocab.log_scale)] == 0.01 and wd[id(m.transformer_decoder.class_embed[0].bias)] == 0.01
    # embeddings as the modules declare them (no parameter names in the trainer)
    assert wd[id(m.in_vocab.void_embedding)] == wd[id(m.transformer_decoder.level_embed.weight)] == 0.02
    m.in_vocab.embedding_parameters = ()
    wd = {id(p): g["weight_decay"] for g in train_net.Trainer.build_optimizer(cfg, m).param_groups
          for p in g["params"]}
    assert wd[id(m.in_vocab.void_embedding)] == 0.05
    del m.in_vocab.embedding_parameters

    cfg.SOLVER.WEIGHT_DECAY_RULE = "timm"
    with pytest.raises(ValueError, match="WEIGHT_DECAY_RULE"):
        train_net.Trainer.build_optimizer(cfg, m)


def test_evaluators_follow_evaluator_type_and_model_outputs(dataset, tmp_path):
    _, val = dataset
    cfg = tiny_mask_cfg(OUTPUT_DIR=str(tmp_path))
    evs = train_net.Trainer.build_evaluator(cfg, val)._evaluators
    assert sorted(type(e).__name__ for e in evs) == ["OVSegPanopticEvaluator", "OVSemSegEvaluator"]
    assert all(isinstance(e, (SemSegEvaluator, COCOPanopticEvaluator)) for e in evs)
    cfg.MODEL.MASK_SEG.TEST.PANOPTIC_ON = False
    evs = train_net.Trainer.build_evaluator(cfg, val)._evaluators
    assert len(evs) == 1 and isinstance(evs[0], SemSegEvaluator)
    cfg.MODEL.META_ARCHITECTURE = "CLIPDenseSegmentor"
    assert [type(e).__name__ for e in train_net.Trainer.build_evaluator(cfg, val)._evaluators] == ["OVSemSegEvaluator"]


@pytest.mark.parametrize("name", ["Base-MaskSeg.yaml", "ade_clipself.yaml"])
def test_configs_parse_and_build_with_the_tiny_clip(name):
    from ovseg.config import get_ovseg_cfg

    cfg = get_ovseg_cfg()
    cfg.merge_from_file(f"configs/{name}")
    assert cfg.MODEL.META_ARCHITECTURE == "OpenVocabMaskSegmentor"
    # same model at toy size: the tiny CLIP (2 exported levels) and no datasets
    cfg.merge_from_list(["MODEL.CLIP.MODEL_NAME", "ovseg-tiny-ViT-16", "MODEL.CLIP.PRETRAINED", "",
                         "MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
                         "MODEL.TEXT.VOCABULARY", "a,b", "MODEL.TEXT.TEMPLATES", "single",
                         "MODEL.MASK_SEG.PIXEL_DECODER.IN_FEATURES", ["res2", "res2", "res3", "res3"],
                         "MODEL.MASK_SEG.DECODER.LAYERS", 1, "MODEL.MASK_SEG.PIXEL_DECODER.TRANSFORMER_LAYERS", 1])
    m = build_model(cfg).eval()
    with torch.no_grad():
        out = m([{"image": torch.rand(3, 32, 48) * 255}])[0]
    assert set(out) == {"sem_seg", "panoptic_seg"} | ({"instances"} if cfg.MODEL.MASK_SEG.TEST.INSTANCE_ON else set())


def _fcclip_lsj_targets(png: np.ndarray, segments, tfms):
    """FC-CLIP's panoptic LSJ targets, written out with PIL / numpy: the RGB PNG flipped, resized with PIL NEAREST,
    cropped and zero-padded; ids read afterwards; one mask per non-crowd segment, empty or not."""
    from detectron2.data.transforms import CropTransform, HFlipTransform, NoOpTransform, PadTransform, ResizeTransform

    img = png
    for t in tfms:
        if isinstance(t, NoOpTransform):
            continue
        if isinstance(t, HFlipTransform):
            img = img[:, ::-1]
        elif isinstance(t, ResizeTransform):
            img = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((t.new_w, t.new_h), Image.NEAREST))
        elif isinstance(t, CropTransform):
            img = img[t.y0:t.y0 + t.h, t.x0:t.x0 + t.w]
        elif isinstance(t, PadTransform):
            img = np.pad(img, ((t.y0, t.y1), (t.x0, t.x1), (0, 0)))
        else:
            raise AssertionError(f"unexpected transform {t}")
    ids = img[..., 0].astype(np.int64) + 256 * img[..., 1] + 65536 * img[..., 2].astype(np.int64)
    keep = [s for s in segments if not s.get("iscrowd", 0)]
    return [s["category_id"] for s in keep], [ids == s["id"] for s in keep]


def test_panoptic_lsj_targets_follow_fcclip(tmp_path):
    from detectron2.data import transforms as T

    rng = np.random.default_rng(0)
    h, w = 70, 90
    ids = np.zeros((h, w), np.int64)
    segments = []
    for k in range(12):  # blocks of random size and place, some of a pixel or two
        y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
        ids[y:y + rng.integers(1, 30), x:x + rng.integers(1, 30)] = 1000 + 77 * k
    for k, sid in enumerate(np.unique(ids)[1:]):
        segments.append({"id": int(sid), "category_id": k % 5, "iscrowd": int(k == 3)})
    png = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    Image.fromarray(png).save(tmp_path / "pan.png")
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    record = {"file_name": str(tmp_path / "img.png"), "pan_seg_file_name": str(tmp_path / "pan.png"),
              "height": h, "width": w, "segments_info": segments}
    augs = [T.RandomFlip(horizontal=True), T.ResizeScale(0.2, 1.6, 64, 64),
            T.FixedSizeCrop(crop_size=(64, 64), seg_pad_value=0)]
    mapper = MaskPanopticLSJMapper(augmentations=augs, image_format="RGB")
    emptied = 0
    for seed in range(12):
        np.random.seed(seed)
        out = mapper(record)
        np.random.seed(seed)  # the same draws (they depend on the image size only)
        tfms = T.AugmentationList(augs)(T.AugInput(np.zeros((h, w, 3), np.uint8)))
        classes, masks = _fcclip_lsj_targets(png, segments, tfms)
        inst = out["instances"]
        assert inst.gt_classes.tolist() == classes
        for m, ref in zip(inst.gt_masks.tensor, masks):
            assert torch.equal(m, torch.from_numpy(ref))
        emptied += sum(not m.any() for m in masks)
    assert emptied > 0  # the draws did cut segments away, and they stayed as empty targets


def test_train_vocabulary_must_match_the_training_set():
    """Labels index the training vocabulary: a TRAIN_VOCABULARY of another size would name every class wrongly."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = "_ovseg_three_class_train"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(stuff_classes=["sky", "grass", "road"])
    with pytest.raises(ValueError, match="TRAIN_VOCABULARY has 2 classes but DATASETS.TRAIN .* has 3"):
        build_model(tiny_mask_cfg(DATASETS__TRAIN=f"('{name}',)", MODEL__MASK_SEG__TRAIN_VOCABULARY="a,b",
                                  MODEL__TEXT__VOCABULARY="a,b"))
    model = build_model(tiny_mask_cfg(DATASETS__TRAIN=f"('{name}',)", MODEL__MASK_SEG__TRAIN_VOCABULARY="a,b,c",
                                      MODEL__TEXT__VOCABULARY="a,b"))
    assert model.train_vocabulary.names == ["a", "b", "c"]
