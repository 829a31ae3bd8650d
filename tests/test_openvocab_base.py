"""The shared base of the open-vocabulary models: one CLIP load, the vocabulary state (lazy, thing flags of a
vocabulary file given for a dataset), the one "seen" rule shared by the ensemble and the evaluator, the tensor core
of the mask segmentor, and the trainable parts (unlock patterns, trainable text classifier)."""
import re

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from PIL import Image

import ovseg.modeling.clip_model as clip_model
from ovseg import engine
from ovseg.data.class_table import class_list_path, load_class_table
from ovseg.modeling.backbone.clip_vit import CLIPViTDenseEncoder
from ovseg.modeling.meta_arch import OpenVocabModel
from ovseg.modeling.text import TextClassifier
from tests.helpers import TINY_EVA, tiny_cfg
from tests.tiny_mask import tiny_mask_cfg

FCCLIP_ADE = class_list_path("fcclip/ade20k_150")
ADE_PANOPTIC = "ade20k_150_panoptic_val"


@pytest.fixture(scope="module")
def dense():
    return build_model(tiny_cfg(MODEL__TEXT__VOCABULARY="cat,dog"))


@pytest.mark.parametrize("arch", ["CLIPDenseSegmentor", "OpenVocabMaskSegmentor", "CLIPSelfDistiller"])
def test_every_model_is_an_openvocab_model_loading_clip_once(arch, monkeypatch):
    calls = []
    real = clip_model.load_open_clip

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(clip_model, "load_open_clip", counting)
    cfg = tiny_mask_cfg(MODEL__TEXT__VOCABULARY="cat,dog") if arch == "OpenVocabMaskSegmentor" else \
        tiny_cfg(MODEL__TEXT__VOCABULARY="cat,dog")
    cfg.MODEL.META_ARCHITECTURE = arch
    model = build_model(cfg)
    assert isinstance(model, OpenVocabModel) and len(calls) == 1
    assert model.vocabulary.names == ["cat", "dog"] and model.device == torch.device("cpu")


def test_vocabulary_is_resolved_lazily():
    """A dataset registered after the model is built is its initial vocabulary."""
    name = "base_test_late_dataset"
    model = build_model(tiny_cfg(DATASETS__TEST=f"('{name}',)"))
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(stuff_classes=["road", "tree"], evaluator_type="sem_seg")
    assert model.vocabulary.names == ["road", "tree"]
    assert model.is_thing.tolist() == [False, False]  # a semantic dataset: all stuff


def test_vocabulary_file_for_a_dataset_keeps_its_thing_flags(dense):
    """FC-CLIP's ADE list tested on ADE panoptic: its names, the dataset's thing / stuff flags (not all things)."""
    expected = [c.isthing for c in load_class_table("ade20k_150")]  # the class table's flags, read directly
    assert 0 < sum(expected) < 150
    cfg = tiny_cfg(MODEL__TEXT__VOCABULARY=FCCLIP_ADE)
    engine.set_test_vocabulary(dense, cfg, ADE_PANOPTIC)
    with open(FCCLIP_ADE, encoding="utf-8") as f:
        first = [ln.split("|")[0].strip() for ln in f if ln.strip() and not ln.startswith("#")]
    assert dense.vocabulary.names == first
    assert dense.is_thing.tolist() == expected
    # without a dataset a list is all things; the dataset's own classes carry the same flags
    dense.set_vocabulary(FCCLIP_ADE)
    assert dense.is_thing.all()
    dense.set_vocabulary(ADE_PANOPTIC)
    assert dense.is_thing.tolist() == expected
    # a list with another class count is not "the dataset's classes under other names"
    with pytest.raises(ValueError, match="has 2 classes but dataset 'ade20k_150_panoptic_val' has 150"):
        engine.set_test_vocabulary(dense, tiny_cfg(MODEL__TEXT__VOCABULARY="cat,dog"), ADE_PANOPTIC)


def _normalise(name):
    return " ".join(name.lower().replace("-", " ").replace("_", " ").split())


def _reference_seen(test_entries, train_entries):
    """Written out: a class is seen when one of its names equals a name of a training class (case, '-', '_'
    ignored)."""
    train = {_normalise(s) for e in train_entries for s in e.split("|")}
    return [any(_normalise(s) in train for s in e.split("|")) for e in test_entries]


@pytest.fixture(scope="module")
def seen_dataset(tmp_path_factory):
    """A sem-seg dataset of 4 classes with one ground-truth image, and the model's training vocabulary (not COCO)."""
    root = tmp_path_factory.mktemp("seen")
    gt = np.random.default_rng(0).integers(0, 4, (32, 48)).astype(np.uint8)
    gt[:3] = 255
    Image.fromarray(gt).save(root / "gt.png")
    name = "base_test_seen_split"
    record = {"file_name": str(root / "img.jpg"), "sem_seg_file_name": str(root / "gt.png"), "height": 32,
              "width": 48}
    DatasetCatalog.register(name, lambda: [record])
    vocabulary = ["person", "Rock_Wall|cliff", "sky", "pink-flamingo"]
    MetadataCatalog.get(name).set(stuff_classes=[v.split("|")[0] for v in vocabulary], vocabulary=vocabulary,
                                  ignore_label=255, evaluator_type="sem_seg")
    return name, record, gt, vocabulary


def test_seen_split_follows_the_training_vocabulary(seen_dataset):
    """Trained on a non-COCO vocabulary: the evaluator splits mIoU by it, and agrees with the model's ensemble."""
    name, record, gt, vocabulary = seen_dataset
    train = "rock wall|stone,pink flamingo,tree"
    cfg = tiny_mask_cfg(MODEL__MASK_SEG__TRAIN_VOCABULARY=train, DATASETS__TEST=f"('{name}',)",
                        MODEL__MASK_SEG__TEST__PANOPTIC_ON=False)
    expected = _reference_seen(vocabulary, train.split(","))
    assert expected == [False, True, False, True]
    # under the COCO split "person" and "sky" would be the seen ones: the test tells the two apart
    coco = [c.vocabulary_entry for c in load_class_table("coco_panoptic_133")]
    assert _reference_seen(vocabulary, coco) != expected

    model = build_model(cfg)
    engine.set_test_vocabulary(model, cfg, name)
    (ev,) = engine.Trainer.build_evaluator(cfg, name)._evaluators
    assert model.seen.tolist() == expected == ev.seen
    assert ev.seen_unseen_classes() == (["Rock_Wall", "pink-flamingo"], ["person", "sky"])

    pred = np.random.default_rng(1).integers(0, 4, gt.shape)
    ev.reset()
    ev.process([record], [{"sem_seg": torch.nn.functional.one_hot(torch.from_numpy(pred), 4).permute(2, 0, 1)
                           .float()}])
    res = ev.evaluate()["sem_seg"]
    valid = gt != 255
    iou = [100 * np.sum((pred == c) & (gt == c) & valid) / np.sum(((pred == c) | (gt == c)) & valid)
           for c in range(4)]
    assert res["mIoU-seen"] == pytest.approx(np.mean([iou[1], iou[3]]))
    assert res["mIoU-unseen"] == pytest.approx(np.mean([iou[0], iou[2]]))


def test_model_without_training_vocabulary_gets_the_reference_split(seen_dataset, dense):
    """A training-free model learned no class names: the benchmark's reference split (its metadata's)."""
    name, _, _, vocabulary = seen_dataset
    cfg = tiny_cfg(DATASETS__TEST=f"('{name}',)")
    (ev,) = engine.Trainer.build_evaluator(cfg, name)._evaluators
    assert ev.seen is None and ev.seen_unseen_classes() == ([], [])  # this dataset has no reference split
    coco = _reference_seen(vocabulary, [c.vocabulary_entry for c in load_class_table("coco_panoptic_133")])
    names = [v.split("|")[0] for v in vocabulary]
    split = ([n for n, s in zip(names, coco) if s], [n for n, s in zip(names, coco) if not s])
    MetadataCatalog.get(name).set(seen_classes=split[0], unseen_classes=split[1])
    (ev,) = engine.Trainer.build_evaluator(cfg, name)._evaluators
    assert ev.seen_unseen_classes() == split
    engine.set_test_vocabulary(dense, cfg, name)
    assert not dense.seen.any()


def test_mask_segmentor_tensor_core_batches_like_single_images():
    torch.manual_seed(0)
    model = build_model(tiny_mask_cfg(MODEL__TEXT__VOCABULARY="cat|kitty,dog,sky")).eval()
    images = model.normalize(torch.rand(2, 3, 64, 80) * 255)
    embeds, owner = model.text_queries(model.vocabulary, "max")
    assert owner.tolist() == [0, 0, 1, 2]
    with torch.no_grad():
        both = model.segment(images, embeds, owner)
        one = model.segment(images[1:], embeds, owner)
    assert both["class_probs"].shape == (2, 8, 4) and both["pred_masks"].shape[:2] == (2, 8)
    torch.testing.assert_close(both["class_probs"][1:], one["class_probs"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both["pred_masks"][1:], one["pred_masks"], rtol=1e-4, atol=1e-4)


def test_unlock_patterns_train_exactly_the_named_parameters():
    visual, _ = clip_model.load_clip_towers(tiny_cfg(MODEL__CLIP__MODEL_NAME=TINY_EVA))
    pattern = r"blocks\.0\.attn\.(q|v)_proj"
    encoder = CLIPViTDenseEncoder(visual=visual, unlock_patterns=[pattern])
    names = [n for n, _ in encoder.tower.visual.named_parameters()]
    # brute force: the names that contain block 0's q or v projection
    expected = {n for n in names if n.startswith("trunk.blocks.0.attn.q_proj.")
                or n.startswith("trunk.blocks.0.attn.v_proj.")}
    assert len(expected) == 4  # weight and bias of each
    encoder.train()
    out = encoder(torch.rand(2, 3, 48, 48))
    sum(v.float().sum() for v in out.values()).backward()
    with_grad = {n for n, p in encoder.tower.visual.named_parameters() if p.grad is not None}
    assert with_grad == expected
    assert {n for n, p in encoder.tower.visual.named_parameters() if p.requires_grad} == expected
    assert [b.training for b in encoder.tower.blocks] == [True] + [False] * (len(encoder.tower.blocks) - 1)
    # with the last block unlocked too: the union
    both = CLIPViTDenseEncoder(visual=clip_model.load_clip_towers(tiny_cfg(MODEL__CLIP__MODEL_NAME=TINY_EVA))[0],
                               unlock_patterns=[pattern], unlock_last_blocks=1)
    last = len(both.tower.blocks) - 1
    trainable = {n for n, p in both.tower.visual.named_parameters() if p.requires_grad}
    assert trainable == expected | {n for n in names if n.startswith(f"trunk.blocks.{last}.")}
    with pytest.raises(ValueError, match="matches no parameter"):
        CLIPViTDenseEncoder(visual=visual, unlock_patterns=[r"attn\.qq_proj"])
    with pytest.raises(ValueError, match="not a regular expression"):
        CLIPViTDenseEncoder(visual=visual, unlock_patterns=["attn.(q"])


def test_unlock_patterns_from_the_config():
    model = build_model(tiny_cfg(MODEL__TEXT__VOCABULARY="cat", MODEL__CLIP__UNLOCK_PATTERNS=[r"ln_post"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(re.search(r"^backbone\.tower\.visual\.ln_post\.", n) for n in trainable)


def test_trainable_text_classifier_gives_gradients_and_does_not_cache():
    _, text_model = clip_model.load_clip_towers(tiny_cfg())
    cfg = tiny_cfg(MODEL__TEXT__TRAINABLE=True)
    clf = TextClassifier(cfg, text_model=text_model).train()
    assert clf.text_model.training
    first = clf("cat,dog|puppy")
    assert first.requires_grad and first.shape[0] == 2
    first.sum().backward()
    grads = [p.grad for p in clf.text_model.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    forwards = clf.num_encoder_forwards
    clf("cat,dog|puppy")
    assert clf.num_encoder_forwards > forwards  # encoded again: nothing cached
    with torch.no_grad():
        for p in clf.text_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        torch.testing.assert_close(clf("cat").norm(dim=-1), torch.ones(1))
        assert not torch.allclose(clf("cat"), first[:1].detach())  # the new weights, not a stale cache
    # the default stays frozen and cached
    frozen = TextClassifier(tiny_cfg(), text_model=clip_model.load_clip_towers(tiny_cfg())[1]).train()
    assert not frozen.text_model.training and not any(p.requires_grad for p in frozen.parameters())
    frozen("cat")
    n = frozen.num_encoder_forwards
    assert not frozen("cat").requires_grad and frozen.num_encoder_forwards == n


def test_trainable_text_tower_trains_with_the_mask_segmentor():
    torch.manual_seed(0)
    model = build_model(tiny_mask_cfg(MODEL__MASK_SEG__TRAIN_VOCABULARY="red circle,green square",
                                      MODEL__TEXT__VOCABULARY="a,b", MODEL__TEXT__TRAINABLE=True)).train()
    from tests.test_mask_segmentor import _instances

    losses = model([{"image": torch.rand(3, 64, 64) * 255, "instances": _instances(64, 64)}])
    sum(losses.values()).backward()
    assert any(p.grad is not None for p in model.text_classifier.parameters())
    assert all(p.grad is None for p in model.backbone.parameters())
