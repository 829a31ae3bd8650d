"""Proof that the mask segmentor learns through train_net.py, and that --resume continues a stopped run."""
import json

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import HookBase, default_argument_parser

from ovseg import engine as train_net
from tests.synthetic_panoptic import make_dataset
from tests.tiny_mask import tiny_mask_cfg


def _cfg(tmp_path, train, val, iters, **overrides):
    opts = dict(
        DATASETS__TRAIN=f"('{train}',)", DATASETS__TEST=f"('{val}',)",
        INPUT__DATASET_MAPPER_NAME="mask_panoptic_lsj", INPUT__IMAGE_SIZE=96, INPUT__MIN_SCALE=0.7,
        INPUT__MAX_SCALE=1.3, INPUT__MIN_SIZE_TEST=96, INPUT__MAX_SIZE_TEST=96,
        SOLVER__IMS_PER_BATCH=4, SOLVER__BASE_LR=1e-3, SOLVER__MAX_ITER=iters, SOLVER__STEPS="()",
        SOLVER__WARMUP_ITERS=10, SOLVER__CHECKPOINT_PERIOD=100000, TEST__EVAL_PERIOD=0,
        SOLVER__CLIP_GRADIENTS__ENABLED=True, SOLVER__CLIP_GRADIENTS__CLIP_TYPE="full_model",
        SOLVER__CLIP_GRADIENTS__CLIP_VALUE=1.0, DATALOADER__NUM_WORKERS=0, OUTPUT_DIR=str(tmp_path / "out"),
        # A random tiny CLIP knows nothing, so its out-of-vocabulary opinion is noise: score seen classes with the
        # trained classifier only (the ensemble itself is unit-tested).
        MODEL__MASK_SEG__CLASSIFIER__ENSEMBLE_ALPHA=0.0, MODEL__MASK_SEG__TEST__OBJECT_MASK_THRESHOLD=0.5,
        SEED=0)
    cfg = tiny_mask_cfg(**{**opts, **overrides})
    path = tmp_path / "config.yaml"
    path.write_text(cfg.dump())
    return cfg, path


def _args(config_path, *extra):
    return default_argument_parser().parse_args(["--config-file", str(config_path), *extra])


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "data", n_train=32, n_val=8)


@pytest.mark.slow
def test_training_learns_panoptic_and_semantic(tmp_path, dataset):
    train, val = dataset
    _, path = _cfg(tmp_path, train, val, iters=300)
    before = train_net.main(_args(path, "--eval-only", "MODEL.ALLOW_RANDOM_WEIGHTS", "True"))[val]  # random weights
    train_net.main(_args(path))
    out = tmp_path / "out"
    after = train_net.main(_args(path, "--eval-only", "MODEL.WEIGHTS", str(out / "model_final.pth")))[val]
    # FC-CLIP's semantic inference (the default: every query's mask resized before summing) vs the cheaper one
    # summed on the mask grid
    per_query = train_net.main(_args(path, "--eval-only", "MODEL.WEIGHTS", str(out / "model_final.pth"),
                                     "MODEL.MASK_SEG.TEST.SEMANTIC_RESOLUTION", "mask"))[val]

    losses = [json.loads(ln)["total_loss"] for ln in (out / "metrics.json").read_text().splitlines()
              if "total_loss" in ln]
    assert len(losses) >= 10
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.5 * first, losses

    # detectron2's own evaluators on the synthetic val split (which also holds a class never trained on)
    assert after["panoptic_seg"]["PQ"] > before["panoptic_seg"]["PQ"] + 25, (before, after)
    assert after["panoptic_seg"]["PQ_st"] > 60  # sky / ground
    assert after["sem_seg"]["mIoU"] > before["sem_seg"]["mIoU"] + 30, (before, after)
    # two rules, not one computation: on this toy task they agree to a couple of mIoU (63.5 vs 65.1 with FC-CLIP's
    # class head; 63.0 vs 62.6 with the earlier Linear head)
    assert abs(after["sem_seg"]["mIoU"] - per_query["sem_seg"]["mIoU"]) < 2.5, (after, per_query)
    assert after["panoptic_seg"] == per_query["panoptic_seg"]  # panoptic does not depend on the key


class _StopAt(HookBase):
    def __init__(self, it):
        self.it = it

    def after_step(self):
        if self.trainer.iter == self.it:
            raise KeyboardInterrupt("simulated stop")


def test_resume_continues_iteration_and_optimizer_state(tmp_path, dataset):
    train, val = dataset
    cfg, path = _cfg(tmp_path, train, val, iters=16, SOLVER__CHECKPOINT_PERIOD=6)
    cfg.freeze()
    trainer = train_net.Trainer(cfg)
    trainer.register_hooks([_StopAt(9)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    out = tmp_path / "out"
    assert (out / "last_checkpoint").read_text().strip() == "model_0000005.pth"
    saved = torch.load(out / "model_0000005.pth", map_location="cpu", weights_only=False)
    assert saved["iteration"] == 5

    # what --resume does, inspected: model, optimizer and iteration restored
    resumed = train_net.Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 6
    state = resumed.optimizer.state_dict()
    assert state["state"], "optimizer state (AdamW moments) was not restored"
    for k, v in saved["trainer"]["_trainer"]["optimizer"]["state"].items():
        torch.testing.assert_close(state["state"][k]["exp_avg"], v["exp_avg"])
        assert float(state["state"][k]["step"]) == float(v["step"]) == 6
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, saved["model"][k])

    # and through the command line: the run finishes from iteration 6, not from 0
    n_before = len((out / "metrics.json").read_text().splitlines())
    train_net.main(_args(path, "--resume"))
    final = DetectionCheckpointer(resumed.model).load(str(out / "model_final.pth"))
    assert final["iteration"] == 15
    new = [json.loads(ln) for ln in (out / "metrics.json").read_text().splitlines()[n_before:]]
    assert new and min(r["iteration"] for r in new) >= 6
