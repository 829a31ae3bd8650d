"""Every model that learns class names checks its training sets the same way (`OpenVocabModel.check_training_sets`):
labels index the training vocabulary, so the sets must share one class list and TRAIN_VOCABULARY must match it."""
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from ovseg.engine import load_config_file
from ovseg.utils.paths import resolve_package_path

CONFIGS = {"catseg/catseg_vitb16_coco_stuff.yaml": "CATSEG", "lseg/lseg_vitb16_ade20k.yaml": "LSEG"}


def _register(name, classes):
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(stuff_classes=classes)
    return name


def _cfg(config, opts):
    cfg = load_config_file(resolve_package_path(f"ovseg://configs/{config}"))
    cfg.merge_from_list(["MODEL.CLIP.MODEL_NAME", "ovseg-tiny-ViT-16", "MODEL.CLIP.PRETRAINED", "", "MODEL.DEVICE",
                         "cpu", "DATASETS.TEST", "()", *opts])
    return cfg


@pytest.mark.parametrize("config", list(CONFIGS))
def test_train_vocabulary_of_another_size_is_refused(config):
    three = _register("_ovseg_sets_three", ["sky", "grass", "road"])
    cfg = _cfg(config, ["DATASETS.TRAIN", f"('{three}',)", f"MODEL.{CONFIGS[config]}.TRAIN_VOCABULARY", "a,b"])
    with pytest.raises(ValueError, match=f"MODEL.{CONFIGS[config]}.TRAIN_VOCABULARY has 2 classes but "
                                         "DATASETS.TRAIN .* has 3"):
        build_model(cfg)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_training_sets_with_different_class_lists_are_refused(config):
    three = _register("_ovseg_sets_three", ["sky", "grass", "road"])
    other = _register("_ovseg_sets_other", ["sky", "grass", "tree"])
    cfg = _cfg(config, ["DATASETS.TRAIN", f"('{three}', '{other}')"])
    with pytest.raises(ValueError, match="has another vocabulary than"):
        build_model(cfg)
