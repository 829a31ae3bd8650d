"""ovseg's config keys are grouped by what reads them: each add_*_config function adds keys of its own part only."""
from detectron2.config import get_cfg

from ovseg import config


def _keys(node, prefix=""):
    out = set()
    for k, v in node.items():
        name = f"{prefix}{k}"
        out |= _keys(v, name + ".") if isinstance(v, dict) else {name}
    return out


def _added(add) -> set:
    base = get_cfg()
    return {k for k in _keys(add(get_cfg())) if k not in _keys(base) or _value(add(get_cfg()), k) != _value(base, k)}


def _value(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


# the part each group is for, written out independently of config.py
GROUPS = {
    "add_clipself_config": ("MODEL.CLIPSELF.", "INPUT.CLIPSELF.", "INPUT.REGION_RECOGNITION."),
    "add_mask_segmentor_config": ("MODEL.MASK_SEG.", "INPUT.CROP.SINGLE_CATEGORY_MAX_AREA", "INPUT.COLOR_AUG_SSD",
                                  "INPUT.IMAGE_SIZE", "INPUT.PAD_SIZE",
                                  "INPUT.MIN_SCALE", "INPUT.MAX_SCALE"),
    "add_groupvit_config": ("MODEL.GROUPVIT.", "INPUT.CAPTIONS."),
    "add_lseg_config": ("MODEL.LSEG.",),
    "add_catseg_config": ("MODEL.CATSEG.",),
    "add_engine_config": ("MODEL.PIXEL_", "INPUT.FORMAT", "INPUT.DATASET_MAPPER_NAME", "INPUT.TEST_DATASET_MAPPER_NAME",
                          "SOLVER.", "MODEL.TRUST_PICKLED_WEIGHTS", "MODEL.ALLOW_RANDOM_WEIGHTS",
                          "MODEL.INFERENCE_DTYPE"),
}


def test_each_group_adds_only_its_own_keys():
    for name, prefixes in GROUPS.items():
        added = _added(getattr(config, name))
        assert added, name
        stray = sorted(k for k in added if not k.startswith(prefixes))
        assert not stray, f"{name} adds keys of another part: {stray}"


def test_every_key_belongs_to_a_group():
    groups = set().union(*(_added(getattr(config, n)) for n in GROUPS))
    # added by add_ovseg_config itself
    model_parts = ("MODEL.CLIP.", "MODEL.TEXT.", "MODEL.DENSE_SEG.", "MODEL.SEM_SEG_OUTPUT")
    rest = sorted(k for k in _added(config.add_ovseg_config) - groups if not k.startswith(model_parts))
    assert not rest, f"keys outside every group: {rest}"
