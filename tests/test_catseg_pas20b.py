"""CAT-Seg's PAS-20b: MODEL.CATSEG.SYNONYMS "max" against the authors' rule written out (the head run on every name
as a class, argmax, every index past the VOC names -> background), and tools/eval_all.py's PAS-20b column."""
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from ovseg.modeling.text import parse_vocabulary
from tests.test_catseg import tiny_catseg_cfg

# a miniature of voc20b.json: "VOC" names first, then the names that count as background
FOREGROUND = ["cat", "dog", "bus"]
BACKGROUND = ["wall", "sky", "tree", "road", "grass"]
# ovseg's layout of the same benchmark: class 0 = background, named by the background names
OURS = ",".join(["|".join(BACKGROUND)] + FOREGROUND)


def _image(seed: int, h: int = 40, w: int = 56) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=g) * 255  # smooth regions: several classes win somewhere
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]


def _authors_labels(model, image: torch.Tensor) -> tuple:
    """The authors' PAS-20b, written out: the head on the list "foreground names + background names" (one channel
    each, their order), argmax over all channels, index >= len(FOREGROUND) -> background; in ovseg's label order
    (0 = background, foreground k -> k + 1). Also the (S, H, W) probabilities."""
    text = model.class_embeddings(parse_vocabulary(FOREGROUND + BACKGROUND))  # one-name classes
    probs = model.segment(model.normalize(image), text, tuple(image.shape[-2:]))  # (S, H, W)
    index = probs.argmax(0)
    labels = torch.where(index >= len(FOREGROUND), torch.zeros_like(index), index + 1)
    return labels, probs


@pytest.mark.parametrize("pad_len", [16, 6])  # 8 name channels padded to 16 / cut to the 6 most CLIP-similar
def test_max_over_synonyms_is_the_authors_background_rule(pad_len):
    torch.manual_seed(0)
    model = build_model(tiny_catseg_cfg(MODEL__CATSEG__SYNONYMS="max", MODEL__CATSEG__PAD_LEN=pad_len,
                                        MODEL__TEXT__VOCABULARY=OURS)).eval()
    with torch.no_grad():  # zero-initialised padding tokens would hide the padded case
        for p in model.head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert model.vocabulary.classes[0] == tuple(BACKGROUND)
    seen_labels = set()
    for seed in range(3):
        image = _image(seed)
        with torch.no_grad():
            out = model([{"image": image}])[0]["sem_seg"]  # (C, H, W)
            ref_labels, ref_probs = _authors_labels(model, image)
        assert out.shape == (1 + len(FOREGROUND), *image.shape[-2:])
        # the channels are the authors' (in another order, so up to float rounding of the class aggregation's sums)
        n = len(FOREGROUND)
        torch.testing.assert_close(out[1:], ref_probs[:n], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out[0], ref_probs[n:].max(0).values, atol=1e-6, rtol=1e-5)
        # labels exactly, where the authors' best channel leads every channel of another label by more than that
        # rounding (at an exact tie of a foreground and a background name theirs picks the foreground class and
        # ovseg's argmax background, class 0: none occurs here)
        per_label = torch.stack([ref_probs[n:].max(0).values, *ref_probs[:n]])  # (C, H, W)
        top2 = per_label.topk(2, dim=0).values
        clear = top2[0] - top2[1] > 1e-5
        assert clear.float().mean() > 0.99
        assert torch.equal(out.argmax(0)[clear], ref_labels[clear])
        seen_labels |= set(ref_labels.unique().tolist())
    assert 0 in seen_labels and len(seen_labels) > 1  # background and some foreground class both won somewhere


def test_max_over_synonyms_trains_on_the_maximum_logit():
    """Training with "max": the loss sees, per class, the maximum over its names' logits (the logit of the maximum
    probability); written out with a loop over classes."""
    torch.manual_seed(0)
    cfg = tiny_catseg_cfg(MODEL__CATSEG__SYNONYMS="max", MODEL__TEXT__VOCABULARY="",
                          MODEL__CATSEG__TRAIN_VOCABULARY=OURS)
    model = build_model(cfg).train()
    g = torch.Generator().manual_seed(3)
    label = torch.randint(0, 1 + len(FOREGROUND), (64, 64), generator=g)
    label[:4] = 255
    batch = [{"image": _image(5, 64, 64), "sem_seg": label}]
    loss = model(batch)["loss_sem_seg"]
    with torch.no_grad():
        images = model.preprocess(batch, model.backbone.patch_size).tensor
        text = model.class_embeddings(parse_vocabulary(BACKGROUND + FOREGROUND))  # names in ovseg's class order
        logits = model.logits(images, text)  # (1, S, h, w)
        per_class = torch.stack([logits[:, :len(BACKGROUND)].max(1).values,
                                 *logits[:, len(BACKGROUND):].unbind(1)], dim=1)
        ref = model.losses(per_class, label[None])["loss_sem_seg"]
    torch.testing.assert_close(loss.detach(), ref)


def test_synonym_rule_is_checked():
    with pytest.raises(ValueError, match="MODEL.CATSEG.SYNONYMS='maximum'"):
        build_model(tiny_catseg_cfg(MODEL__CATSEG__SYNONYMS="maximum"))


def test_eval_all_pas20b_column_on_a_voc_miniature(tmp_path, monkeypatch):
    """--columns VOC PAS-20b on a prepared VOC miniature: PAS-20b tests on VOC-21 with the authors' voc20b list and
    the "max" rule, the VOC column (PAS-20) keeps the model config's names and rule."""
    from ovseg import engine
    from ovseg.data import register_all_ovseg_datasets
    from tests.data.test_prepare_benchmarks import ROOT, make_voc, prepare_pascal_voc

    spec = importlib.util.spec_from_file_location("eval_all", ROOT / "tools" / "eval_all.py")
    eval_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_all)
    make_voc(tmp_path / "data")
    prepare_pascal_voc.main(["--root", str(tmp_path / "data"), "--workers", "1"])
    voc20 = "ovseg://data/class_lists/authors/catseg/voc20.txt"
    cfg = tiny_catseg_cfg(MODEL__TEXT__VOCABULARY="", MODEL__ALLOW_RANDOM_WEIGHTS=True,
                          MODEL__TEXT__DATASET_VOCABULARIES=f"['pascal_voc_20_sem_seg_val={voc20}']",
                          INPUT__MIN_SIZE_TEST=24, DATALOADER__NUM_WORKERS=0)
    (tmp_path / "tiny_catseg.yaml").write_text(cfg.dump())

    tested = {}
    real_test = engine.Trainer.test.__func__

    def spy(cls, cfg, model, *args, **kwargs):
        out = real_test(cls, cfg, model, *args, **kwargs)
        tested[cfg.DATASETS.TEST[0]] = (model.vocabulary, model.synonyms)
        return out

    monkeypatch.setattr(engine.Trainer, "test", classmethod(spy))
    register_all_ovseg_datasets(str(tmp_path / "data"))
    try:
        scores = eval_all.main(["--config-file", str(tmp_path / "tiny_catseg.yaml"), "--columns", "VOC", "PAS-20b",
                                "--output", str(tmp_path / "res")])
    finally:
        register_all_ovseg_datasets()
    report = json.loads((tmp_path / "res" / "results.json").read_text())
    assert set(scores) == {"VOC", "PAS-20b"}, report["details"]
    assert report["details"]["PAS-20b"]["dataset"] == "pascal_voc_21_sem_seg_val"
    assert scores["PAS-20b"] == report["details"]["PAS-20b"]["results"]["sem_seg"]["mIoU"]
    vocab, rule = tested["pascal_voc_21_sem_seg_val"]
    authors = parse_vocabulary("ovseg://data/class_lists/authors/catseg/voc20b.txt")
    assert rule == "max" and vocab == authors and len(vocab) == 21
    assert len(vocab.classes[0]) == 39 and vocab.names[1:] == parse_vocabulary(voc20).names
    assert tested["pascal_voc_20_sem_seg_val"] == (parse_vocabulary(voc20), "first")
    header = (tmp_path / "res" / "results.md").read_text().splitlines()[0]
    assert header.endswith("| COCO PQ | PAS-20b |")
