"""Every shipped config parses, and builds its model (with the tiny CLIP swapped in), from any working directory;
the checkout's `configs/` is a link to the package's `ovseg/configs/`."""
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from ovseg.config import get_ovseg_cfg
from ovseg.engine import Trainer
from ovseg.modeling.meta_arch.base import dataset_vocabularies
from ovseg.modeling.text import parse_vocabulary

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = ROOT / "ovseg" / "configs"
CONFIGS = sorted(p for p in PACKAGED.rglob("*.yaml") if not p.name.startswith("Base-"))


def test_configs_folder_is_a_link_to_the_package():
    assert (ROOT / "configs").is_symlink() and (ROOT / "configs").resolve() == PACKAGED.resolve()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(PACKAGED)))
def test_config_builds(path, tmp_path, monkeypatch):
    cfg = get_ovseg_cfg()
    cfg.merge_from_file(str(path))
    linked = get_ovseg_cfg()  # the users' spelling, configs/..., with _BASE_ followed through the link
    linked.merge_from_file(str(ROOT / "configs" / path.relative_to(PACKAGED)))
    assert linked.dump() == cfg.dump()
    monkeypatch.chdir(tmp_path)  # class lists named in configs resolve outside the checkout too
    for spec in (cfg.MODEL.TEXT.VOCABULARY, cfg.MODEL.MASK_SEG.TRAIN_VOCABULARY,
                 *dataset_vocabularies(cfg).values()):
        if spec:
            assert len(parse_vocabulary(spec)) > 0
    cfg.merge_from_list(["MODEL.CLIP.MODEL_NAME", "ovseg-tiny-ViT-16", "MODEL.CLIP.PRETRAINED", "", "MODEL.DEVICE",
                         "cpu", "MODEL.CLIP.UNLOCK_LAST_BLOCKS", min(cfg.MODEL.CLIP.UNLOCK_LAST_BLOCKS, 3)])  # 3 blocks
    if cfg.MODEL.META_ARCHITECTURE == "OpenVocabMaskSegmentor":  # the tiny tower exports two levels
        cfg.MODEL.MASK_SEG.PIXEL_DECODER.IN_FEATURES = ["res2", "res2", "res3", "res3"]
    if cfg.MODEL.META_ARCHITECTURE == "LSegSegmentor":  # the tiny tower has 3 blocks, all unlocked and decoded
        cfg.MODEL.CLIP.FEATURE_BLOCKS = [0, 1, 2]
        cfg.MODEL.LSEG.IN_FEATURES = ["res2", "res3", "res4", "res4"]
    if cfg.MODEL.META_ARCHITECTURE == "CATSegSegmentor":  # the tiny tower has 3 blocks
        cfg.MODEL.CLIP.FEATURE_BLOCKS = [0, 1]
    model = build_model(cfg)
    if cfg.MODEL.META_ARCHITECTURE == "GroupViTSegmentor":  # its own encoder, trained from scratch, no CLIP tower
        assert model.backbone.patch_size == cfg.MODEL.GROUPVIT.PATCH_SIZE
    else:
        assert model.backbone.dense_mode == cfg.MODEL.CLIP.DENSE_MODE
    if any(p.requires_grad for p in model.parameters()):  # its optimizer and LR schedule build too
        Trainer.build_lr_scheduler(cfg, Trainer.build_optimizer(cfg, model))
    for name in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST:  # datasets named by configs are registered
        assert name in DatasetCatalog.list(), name
    if cfg.MODEL.DENSE_SEG.BG_THRESHOLD > 0:  # the background rule needs a class of that name in the vocabulary
        for name in cfg.DATASETS.TEST:  # the test set's own, or the class list the config names (authors' lists)
            vocab = cfg.MODEL.TEXT.VOCABULARY or name
            classes = [c.lower() for c in model.set_vocabulary(vocab).names]
            assert cfg.MODEL.DENSE_SEG.BACKGROUND_CLASS.lower() in classes, name
            assert len(classes) == len(MetadataCatalog.get(name).stuff_classes), name


def _readme_tiny_smoke_commands():
    """The argv of each `python ...` line of the README's tiny smoke-run block (continuation lines joined)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"their smoke runs set those keys.*?```bash\n(.*?)```", text, re.S)
    assert block, "README.md lacks the tiny smoke-run block"
    lines = block.group(1).replace("\\\n", " ").splitlines()
    return [shlex.split(line)[1:] for line in lines if line.startswith("python ")]


def test_readme_tiny_smoke_commands_build_their_models():
    """Each README smoke command's config, read by the tool's own parser, builds its model: the overrides fit the
    tiny tower (running them all takes about a minute on CPU; they were run by hand)."""
    from detectron2.engine import default_argument_parser

    from ovseg.engine import load_config_file
    from ovseg.utils.paths import resolve_config

    spec = importlib.util.spec_from_file_location("readme_demo_cli", ROOT / "demo" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)

    built = set()
    for argv in _readme_tiny_smoke_commands():
        if argv[0] == "demo/demo.py":
            args = demo.get_parser().parse_args(argv[1:])
            opts = demo.config_overrides(args)
        else:
            assert argv[0] == "train_net.py", argv
            args = default_argument_parser().parse_args(argv[1:])
            opts = args.opts
        cfg = load_config_file(str(resolve_config(args.config_file)), opts, warn=False)
        assert cfg.MODEL.CLIP.MODEL_NAME == "ovseg-tiny-ViT-16" and cfg.MODEL.CLIP.PRETRAINED == "", argv
        build_model(cfg)
        built.add(cfg.MODEL.META_ARCHITECTURE)
    assert built == {"LSegSegmentor", "CATSegSegmentor", "CLIPSelfDistiller"}
