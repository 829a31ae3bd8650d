"""Vocabulary parsing, prompt ensembling and the embedding cache."""
from unittest import mock

import open_clip
import pytest
import torch
import torch.nn.functional as F

from ovseg.modeling import split_clip
from ovseg.modeling.text import TextClassifier, get_templates, make_vocabulary, max_over_synonyms, parse_vocabulary


def test_parse_string_file_and_synonyms(tmp_path):
    v = parse_vocabulary(" cat, sofa|couch ,tv monitor")
    assert v.classes == (("cat",), ("sofa", "couch"), ("tv monitor",))
    assert v.names == ["cat", "sofa", "tv monitor"]
    f = tmp_path / "classes.txt"
    f.write_text("# comment\ncat\n\nsofa | couch\n")
    assert parse_vocabulary(str(f)).classes == (("cat",), ("sofa", "couch"))


def test_vocabulary_files_comments_bom_and_commas(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_bytes("\ufeffcat  # our pet\nsofa|couch#furniture\n   # only a comment\ntv\n".encode("utf-8"))
    assert parse_vocabulary(str(f)).classes == (("cat",), ("sofa", "couch"), ("tv",))
    f.write_text("cat\na,b,c\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: 'a,b,c' has a comma.*one class per\s+line"):
        parse_vocabulary(str(f))


@pytest.mark.parametrize("spec", ["classes.txt", "data/my_classes", "./vocab.csv"])
def test_missing_vocabulary_file_is_an_error(tmp_path, spec):
    with pytest.raises(FileNotFoundError, match="looks like a file path.*no such file"):
        parse_vocabulary(str(tmp_path / spec) if "/" in spec else spec)
    # a '/' inside a real class list is a class name, not a path
    assert parse_vocabulary("tv/monitor|tv,sky").names == ["tv/monitor", "sky"]


def test_names_shared_between_classes_are_warned(caplog):
    caplog.set_level("WARNING", logger="ovseg.modeling.text.vocabulary")
    v = parse_vocabulary("cat|dog,dog")
    assert v.classes == (("cat", "dog"), ("dog",))  # documented: both classes score "dog"
    assert "'dog' in ['cat', 'dog']" in caplog.text
    caplog.clear()
    parse_vocabulary("cat|kitty,dog")
    assert caplog.text == ""
    with pytest.raises(ValueError, match="repeated within the class"):
        parse_vocabulary("cat|Cat,dog")


def test_dataset_lists_with_shared_names_load_quietly(caplog):
    """The published ADE-150 list shares names (ADE's 'stool' class and the 'toilet|...|stool' class)."""
    from detectron2.data import MetadataCatalog

    caplog.set_level("WARNING", logger="ovseg.modeling.text.vocabulary")
    v = parse_vocabulary("ade20k_150_sem_seg_val")
    owners = {}
    for c in v.classes:  # independent count of names in several classes
        for name in c:
            owners.setdefault(name.lower(), set()).add(c[0])
    assert any(len(o) > 1 for o in owners.values())
    assert caplog.text == "" and len(v) == len(MetadataCatalog.get("ade20k_150_sem_seg_val").stuff_classes)


def test_summary_is_short_for_long_vocabularies():
    long = make_vocabulary([f"class{i}" for i in range(2000)])
    text = long.summary()
    assert text.startswith("2000 classes: class0, class1") and "(+1980 more)" in text and len(text) < 400
    assert make_vocabulary(["a", "b"]).summary() == "2 classes: a, b"


def test_parse_registered_dataset():
    from detectron2.data import MetadataCatalog

    MetadataCatalog.get("_ovseg_test_vocab_ds").set(stuff_classes=["road", "sky"], vocabulary=["road|route", "sky"])
    assert parse_vocabulary("_ovseg_test_vocab_ds").classes == (("road", "route"), ("sky",))


@pytest.mark.parametrize("spec,match", [
    ("", "empty"), ("   ", "empty"), ([], "empty"), ("cat,,dog", "blank"), ("cat|", "blank"),
    ("cat,Cat", "duplicate"),
])
def test_bad_vocabularies(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_vocabulary(spec)


def _classifier(tiny_clip, templates=("a photo of a {}.", "a {}.")):
    model = tiny_clip()
    _, text_model = split_clip(model)
    return TextClassifier(text_model=text_model, tokenizer=open_clip.get_tokenizer("ovseg-tiny-ViT-16"),
                          templates=templates, batch_size=3), text_model


def test_embeddings_are_prompt_and_synonym_averages(tiny_clip):
    clf, text_model = _classifier(tiny_clip)
    emb = clf("cat,sofa|couch")
    tok = open_clip.get_tokenizer("ovseg-tiny-ViT-16")

    def manual(names):
        prompts = [t.format(n) for n in names for t in ("a photo of a {}.", "a {}.")]
        with torch.no_grad():
            e = F.normalize(text_model.encode_text(tok(prompts)), dim=-1)
        return F.normalize(e.mean(0), dim=0)

    torch.testing.assert_close(emb[0], manual(["cat"]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(emb[1], manual(["sofa", "couch"]), atol=1e-6, rtol=1e-5)
    assert emb.shape == (2, 32) and not emb.requires_grad


def test_synonym_embeddings_one_row_per_synonym(tiny_clip):
    clf, _ = _classifier(tiny_clip)
    emb, owner = clf.synonym_embeddings("cat,sofa|couch|settee,dog")
    assert owner.tolist() == [0, 1, 1, 1, 2]
    for row, name in zip(emb, ["cat", "sofa", "couch", "settee", "dog"]):
        torch.testing.assert_close(row, clf(name)[0])  # each synonym = a one-name class


def test_max_over_synonyms_is_a_per_class_max():
    torch.manual_seed(0)
    owner = torch.tensor([0, 1, 1, 1, 2, 2])
    x = torch.randn(4, 6, 5)  # synonyms along dim 1
    out = max_over_synonyms(x, owner, 3, dim=1)
    expected = torch.stack([x[:, owner == c].amax(1) for c in range(3)], dim=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    last = max_over_synonyms(x.transpose(1, 2), owner, 3)  # default: last dim
    torch.testing.assert_close(last, expected.transpose(1, 2), rtol=0, atol=0)
    same = torch.randn(2, 3)
    assert max_over_synonyms(same, torch.arange(3), 3) is same


def test_cached_embeddings_do_not_depend_on_the_callers_autocast(tiny_clip):
    fp32, _ = _classifier(tiny_clip)
    reference = fp32("cat,sofa|couch")
    under_bf16, _ = _classifier(tiny_clip)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached = under_bf16("cat,sofa|couch")
    torch.testing.assert_close(cached, reference, rtol=0, atol=0)
    torch.testing.assert_close(under_bf16("cat,sofa|couch"), reference, rtol=0, atol=0)  # the cache, outside


def test_cache_avoids_text_forwards(tiny_clip):
    clf, text_model = _classifier(tiny_clip)
    with mock.patch.object(text_model, "encode_text", wraps=text_model.encode_text) as spy:
        first = clf("cat,dog,sofa|couch")
        calls = spy.call_count
        assert calls == 3  # 4 names x 2 templates = 8 prompts, batches of 3
        again = clf("cat,dog,sofa|couch")
        assert spy.call_count == calls  # repeated vocabulary: no forward
        torch.testing.assert_close(again, first)
        subset = clf("sofa|couch,cat")  # known classes in another order: no forward either
        assert spy.call_count == calls
        torch.testing.assert_close(subset, first[[2, 0]])
        clf("cat,bird")  # only "bird" is new: 2 prompts, one batch
        assert spy.call_count == calls + 1
    assert clf.num_encoder_forwards == calls + 1


def test_long_encodings_show_progress(tiny_clip, caplog):
    import ovseg.modeling.text.text_classifier as tc

    clf, _ = _classifier(tiny_clip)  # 2 templates, batches of 3 prompts
    bars = []

    def spy(iterable, **kwargs):
        bars.append((len(iterable), kwargs.get("disable", False)))
        return iterable

    caplog.set_level("INFO", logger="ovseg.modeling.text.text_classifier")
    short_classes = 3 * (tc.PROGRESS_MIN_FORWARDS - 1) // 2  # 2 prompts per class: just below the bar
    long_classes = short_classes + 2
    with mock.patch.object(tc, "tqdm", side_effect=spy):
        clf([f"short{i}" for i in range(short_classes)])
        clf([f"long{i}" for i in range(long_classes)])
    forwards = [-(-2 * n // 3) for n in (short_classes, long_classes)]  # ceil(prompts / batch)
    assert forwards[0] < tc.PROGRESS_MIN_FORWARDS <= forwards[1]
    assert bars == [(forwards[0], True), (forwards[1], False)]
    assert f"encoding {long_classes} classes ({2 * long_classes} prompts" in caplog.text
    assert "short0" not in caplog.text and "long0" not in caplog.text  # counts, not names


def test_template_sets():
    assert len(get_templates("imagenet")) == 80 and len(get_templates("single")) == 1
    assert all("{}" in t for t in get_templates("simple"))
    with pytest.raises(ValueError, match="TEMPLATES"):
        get_templates("nope")
    assert len(make_vocabulary(["a", "b"])) == 2
