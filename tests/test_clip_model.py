"""Loading CLIP weights from tags and local files, with clear errors; weights files never run code."""
import pickle
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from ovseg.modeling.clip_model import WeightsUnavailableError, load_open_clip
from ovseg.utils.safe_load import UntrustedWeightsError
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


class Hostile:
    """Unpickling this creates the file `marker` (stands for any code a pickle can run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile_files(tmp_path, tiny_clip):
    """The payload inside a real state dict: torch's zip format, its legacy format, and a plain pickle."""
    marker = tmp_path / "pwned"
    state = dict(tiny_clip().state_dict(), payload=Hostile(marker))
    torch.save(state, tmp_path / "hostile_zip.pt")
    torch.save(state, tmp_path / "hostile_legacy.pth", _use_new_zipfile_serialization=False)
    with open(tmp_path / "hostile_plain.pkl", "wb") as f:
        pickle.dump(state, f, protocol=2)
    return marker, [tmp_path / "hostile_zip.pt", tmp_path / "hostile_legacy.pth", tmp_path / "hostile_plain.pkl"]


def test_hostile_pickle_is_refused_without_running(tiny_clip, tmp_path):
    marker, files = _hostile_files(tmp_path, tiny_clip)
    for path in files:
        with pytest.raises(UntrustedWeightsError, match=r"MODEL.CLIP.PRETRAINED=.*hostile.*could run code.*"
                                                        r"MODEL.CLIP.TRUST_PICKLED_WEIGHTS True"):
            load_open_clip(TINY_VIT, str(path))
        assert not marker.exists(), path
    # the same loader behind every model: a config naming the file fails the same way
    from detectron2.modeling import build_model

    from tests.helpers import tiny_cfg

    with pytest.raises(UntrustedWeightsError, match="TRUST_PICKLED_WEIGHTS"):
        build_model(tiny_cfg(MODEL__CLIP__PRETRAINED=str(files[0]), MODEL__TEXT__VOCABULARY="a,b"))
    assert not marker.exists()
    # control: with the explicit opt-in the pickle is unpickled, so the marker proves the test could see execution
    with pytest.raises(ValueError, match="does not hold a state dict of tensors"):
        load_open_clip(TINY_VIT, str(files[0]), trust_pickled_weights=True)
    assert marker.exists()


def test_convert_script_refuses_hostile_pickle(tiny_clip, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import convert_to_open_clip

    marker, files = _hostile_files(tmp_path, tiny_clip)
    out = tmp_path / "out.pt"
    argv = ["--model-name", TINY_VIT, "--input", str(files[0]), "--output", str(out)]
    with pytest.raises(UntrustedWeightsError, match="--trust-pickled-weights"):
        convert_to_open_clip.main(argv)
    assert not marker.exists() and not out.exists()


def test_safetensors_and_trusted_torchscript_load(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    ref = tiny_clip(seed=4)
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous().clone() for k, v in ref.state_dict().items()}, str(path))
    torch.manual_seed(1)
    loaded = load_open_clip(TINY_VIT, str(path))
    for (k, a), (_, b) in zip(ref.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    # a TorchScript archive holds code: refused unless trusted, then read by torch.jit
    scripted = torch.jit.script(torch.nn.ParameterDict({"x": torch.nn.Parameter(torch.ones(2))}))
    jit_path = tmp_path / "scripted.pt"
    torch.jit.save(scripted, str(jit_path))
    with pytest.raises(UntrustedWeightsError, match="TorchScript"):
        load_open_clip(TINY_VIT, str(jit_path))
    with pytest.raises(ValueError, match="none of the keys"):  # read (trusted), but not a CLIP
        load_open_clip(TINY_VIT, str(jit_path), trust_pickled_weights=True)
