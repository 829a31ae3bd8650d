"""Loading CLIP weights from tags and local files, with clear errors."""
from unittest import mock

import pytest
import torch

from ovseg.modeling.clip_model import WeightsUnavailableError, load_open_clip
from tests.helpers import TINY_MODELS, TINY_VIT


@pytest.mark.parametrize("name", TINY_MODELS)
def test_local_file_round_trip(tiny_clip, tmp_path, name):
    ref = tiny_clip(name, seed=3)
    path = tmp_path / "clip.pt"
    torch.save(ref.state_dict(), path)
    torch.manual_seed(99)  # a different random init, overwritten by the file
    loaded = load_open_clip(name, str(path))
    for (k, a), (_, b) in zip(ref.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_nested_and_prefixed_state_dicts_load(tiny_clip, tmp_path, caplog):
    ref = tiny_clip()
    state = {f"module.{k}": v for k, v in ref.state_dict().items() if not k.startswith("text_projection")}
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    loaded = load_open_clip(TINY_VIT, str(path))
    assert torch.equal(loaded.visual.proj, ref.visual.proj)
    assert "lacks 1 keys" in caplog.text and "text_projection" in caplog.text


def test_ovseg_model_checkpoint_is_a_clip_checkpoint(tmp_path):
    """model_final.pth of an ovseg model (detectron2 format: {"model": state}) loads as CLIP weights."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from tests.helpers import tiny_cfg

    torch.manual_seed(5)
    model = build_model(tiny_cfg(MODEL__TEXT__VOCABULARY="a,b"))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    torch.manual_seed(6)
    clip = load_open_clip(TINY_VIT, str(tmp_path / "model_final.pth"))
    assert torch.equal(clip.visual.conv1.weight, model.backbone.tower.visual.conv1.weight)
    assert torch.equal(clip.text_projection, model.text_classifier.text_model.text_projection)


def test_wrong_files_are_clear_errors(tiny_clip, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_open_clip(TINY_VIT, str(junk))
    other = tmp_path / "other.pt"
    torch.save({"backbone.conv.weight": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="none of the keys"):
        load_open_clip(TINY_VIT, str(other))
    eva = tmp_path / "eva.pt"
    state = tiny_clip().state_dict()
    state["visual.proj"] = torch.zeros(5, 5)
    torch.save(state, eva)
    with pytest.raises(ValueError, match="shape mismatches.*visual.proj"):
        load_open_clip(TINY_VIT, str(eva))
    with pytest.raises(FileNotFoundError, match="MODEL.CLIP.PRETRAINED.*no such file"):
        load_open_clip(TINY_VIT, str(tmp_path / "missing.pt"))


def test_bad_names_and_tags():
    with pytest.raises(ValueError, match="not an open_clip architecture.*ViT-B-16"):
        load_open_clip("ViT-B-61", "")
    with pytest.raises(ValueError, match="neither a file nor an open_clip tag.*openai"):
        load_open_clip("ViT-B-16", "opnai")


def test_download_failure_names_the_config_key():
    with mock.patch("open_clip.create_model", side_effect=RuntimeError("no network")):
        with pytest.raises(WeightsUnavailableError, match="MODEL.CLIP.PRETRAINED.*--random-init"):
            load_open_clip("ViT-B-16", "openai")
