"""MODEL.SEM_SEG_OUTPUT "labels" is never silently ignored: models that always return (C, H, W) scores refuse it."""
import pytest
from detectron2.modeling import build_model

from ovseg.engine import load_config_file
from ovseg.utils.paths import resolve_package_path


@pytest.mark.parametrize("config", ["catseg/catseg_vitb16_coco_stuff.yaml", "lseg/lseg_vitb16_ade20k.yaml",
                                    "groupvit/groupvit_s_captions.yaml"])
def test_scores_only_models_refuse_labels(config):
    cfg = load_config_file(resolve_package_path(f"ovseg://configs/{config}"))
    cfg.merge_from_list(["MODEL.CLIP.MODEL_NAME", "ovseg-tiny-ViT-16", "MODEL.CLIP.PRETRAINED", "", "MODEL.DEVICE",
                         "cpu", "MODEL.SEM_SEG_OUTPUT", "labels"])
    with pytest.raises(ValueError, match="SEM_SEG_OUTPUT='labels' is not supported by"):
        build_model(cfg)
