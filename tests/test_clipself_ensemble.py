"""CLIPSelf's weight-space ensemble (MODEL.CLIPSELF.ENSEMBLE_ALPHA): the student's trained parameters become
alpha * student + (1 - alpha) * teacher after the last step, as the authors' `student_teacher_ensemble`."""
import math

import pytest
import torch
from detectron2.modeling import build_model

from ovseg.modeling.meta_arch import save_open_clip_checkpoint
from tests.helpers import TINY_VIT
from tests.test_clipself_distiller import _cfg, _image_folder


def _trained_model(tmp_path, alpha):
    torch.manual_seed(0)
    model = build_model(_cfg(tmp_path, TINY_VIT, MODEL__CLIPSELF__ENSEMBLE_ALPHA=alpha))
    with torch.no_grad():  # stands in for training: the unlocked student parameters move away from the teacher
        for p in model.backbone.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    return model


def _hand_mix(student, teacher, trained, alpha):
    """The rule written out: trained tensors mixed, every other tensor the student's as it is."""
    return {k: (alpha * v + (1 - alpha) * teacher[k]) if k in trained else v for k, v in student.items()}


def test_ensemble_equals_hand_mixed_state_dict(tmp_path):
    alpha = 0.7
    model = _trained_model(tmp_path, alpha)
    student = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    teacher = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    trained = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    # only the unlocked (last) block trains in this tiny config: a strict, non-empty subset
    assert trained and len(trained) < len(student)
    last = len(model.backbone.tower.blocks) - 1
    assert all(f".resblocks.{last}." in n for n in trained), sorted(trained)
    for k in student:  # frozen tensors are the teacher's anyway: mixing them would change nothing but rounding
        if k not in trained:
            assert torch.equal(student[k], teacher[k]), k

    model.ensemble_with_teacher_()
    expected = _hand_mix(student, teacher, trained, alpha)
    got = model.backbone.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    # the authors' rule over the whole state dict gives the same weights (frozen ones up to float rounding)
    for k in student:
        torch.testing.assert_close(got[k], alpha * student[k] + (1 - alpha) * teacher[k], rtol=0, atol=1e-6)
    # the teacher is untouched, and the export carries the mix
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher[k]), k
    exported = torch.load(save_open_clip_checkpoint(model, str(tmp_path / "mixed.pt")), weights_only=True)
    for k, v in expected.items():
        if k.startswith("tower.visual."):
            assert torch.equal(exported["visual." + k[len("tower.visual."):]], v), k


def test_alpha_one_leaves_student_untouched(tmp_path):
    model = _trained_model(tmp_path, 1.0)
    student = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    assert model.ensembled_student_state_dict().keys() == student.keys()
    model.ensemble_with_teacher_()
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, student[k]), k


@pytest.mark.parametrize("alpha", [1.5, -0.1, math.nan])
def test_bad_alpha_is_an_error(tmp_path, alpha):
    with pytest.raises(ValueError, match=r"ENSEMBLE_ALPHA must be in \[0, 1\]"):
        build_model(_cfg(tmp_path, TINY_VIT, MODEL__CLIPSELF__ENSEMBLE_ALPHA=alpha))


@pytest.mark.parametrize("name", ["clipself_eva02_b16_coco_patches", "clipself_eva02_b16_coco_proposals",
                                  "clipself_vitb16_coco_patches"])
def test_shipped_configs_use_the_authors_alpha(name):
    from ovseg.config import get_ovseg_cfg

    cfg = get_ovseg_cfg()
    assert cfg.MODEL.CLIPSELF.ENSEMBLE_ALPHA == 1.0  # off unless a config sets it
    cfg.merge_from_file(f"configs/clipself/{name}.yaml")
    # CLIPSelf 1c7fe9c, scripts/train_clipself_coco_*_eva_vitb16.sh: --alpha 0.7 (B/16 towers)
    assert cfg.MODEL.CLIPSELF.ENSEMBLE_ALPHA == 0.7


def test_trainer_writes_the_mix_to_model_final(tmp_path):
    """Two iterations through the Trainer: model_final.pth holds the hand mix of the student as trained (recorded
    just before the hook mixes it) and the teacher; the mix happens once."""
    from ovseg import engine as train_net

    alpha = 0.5
    folder = _image_folder(tmp_path / "imgs")
    cfg = _cfg(tmp_path, TINY_VIT, MODEL__CLIPSELF__ENSEMBLE_ALPHA=alpha, SOLVER__MAX_ITER=2,
               SOLVER__BASE_LR=1e-2, SOLVER__WARMUP_ITERS=0, SOLVER__STEPS=[], SOLVER__CHECKPOINT_PERIOD=1000)
    cfg.DATASETS.TRAIN = (folder,)
    cfg.DATASETS.TEST = ()
    torch.manual_seed(0)
    trainer = train_net.Trainer(cfg)
    model = trainer.model
    trained = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    original = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    calls = []
    mix = model.ensemble_with_teacher_

    def spy():
        calls.append({k: v.clone() for k, v in model.backbone.state_dict().items()})
        mix()

    model.ensemble_with_teacher_ = spy
    trainer.train()
    assert len(calls) == 1
    student = calls[0]
    assert any(not torch.equal(student[k], original[k]) for k in trained)  # training moved the student

    final = torch.load(tmp_path / "out" / "model_final.pth", weights_only=False)["model"]
    teacher = {k[len("teacher."):]: v for k, v in final.items() if k.startswith("teacher.")}
    expected = _hand_mix(student, teacher, trained, alpha)
    for k, v in expected.items():
        assert torch.equal(final["backbone." + k], v), k
    assert any(not torch.equal(expected[k], student[k]) for k in trained)  # the mix is not the student
