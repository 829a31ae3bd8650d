"""FC-CLIP's text side shipped as data: the 14 ViLD-style templates and its prompt-engineered class lists, in the
order of ovseg's class tables."""
import os

import pytest

from ovseg.data.class_table import CLASS_LISTS_DIR, load_class_table, normalize_class_name
from ovseg.modeling.text.vocabulary import get_templates, parse_vocabulary

FCCLIP_LISTS = ("coco_panoptic_133", "ade20k_150", "pascal_context_59", "pascal_context_459")


def test_vild_templates():
    t = get_templates("vild")
    assert len(t) == len(set(t)) == 14
    assert all(x.count("{}") == 1 for x in t)


@pytest.mark.parametrize("table", FCCLIP_LISTS)
def test_fcclip_class_lists_follow_the_table_order(table):
    """Line i names class i: it shares a name with the table's class i, except the few classes FC-CLIP renamed
    (a shifted or misaligned list would share almost nothing)."""
    vocab = parse_vocabulary(os.path.join(CLASS_LISTS_DIR, "fcclip", f"{table}.txt"))
    entries = load_class_table(table)
    assert len(vocab) == len(entries)
    shared = 0
    for ours, theirs in zip(entries, vocab.classes):
        names = {normalize_class_name(s) for s in (ours.official_name, *ours.synonyms)}
        shared += bool(names & {normalize_class_name(s) for s in theirs})
    assert shared >= len(entries) - 6


def test_fcclip_config_trains_on_fcclip_text():
    from ovseg.config import get_ovseg_cfg

    cfg = get_ovseg_cfg()
    cfg.merge_from_file("configs/ade_clipself.yaml")
    assert cfg.MODEL.TEXT.TEMPLATES == "vild" and cfg.SOLVER.WEIGHT_DECAY_RULE == "fcclip"
    assert cfg.MODEL.MASK_SEG.DECODER.CLASS_HEAD == "fcclip"
    vocab = parse_vocabulary(cfg.MODEL.MASK_SEG.TRAIN_VOCABULARY)
    assert len(vocab) == 133 and vocab.classes[0][0] == "person"
