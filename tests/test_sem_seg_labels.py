"""MODEL.SEM_SEG_OUTPUT "labels": `sem_seg` as the (H, W) argmax of the scores, without a full-resolution (C, H, W)
float tensor anywhere on the inference path (issue #12: 847 classes at 2000x1500)."""
import pytest
import torch
from detectron2.modeling import build_model
from torch.utils._python_dispatch import TorchDispatchMode

import ovseg.modeling.meta_arch.dense_segmentor as dense_module
import ovseg.modeling.postprocessing as post
from tests.helpers import tiny_cfg
from tests.tiny_mask import tiny_mask_cfg

_SLIDE = {"MODEL__DENSE_SEG__INFERENCE_MODE": "slide", "MODEL__DENSE_SEG__WINDOW_SIZE": 48,
          "MODEL__DENSE_SEG__WINDOW_STRIDE": 24}
CASES = {
    "dense whole": (tiny_cfg, {}),
    "dense slide patch-merge": (tiny_cfg, {**_SLIDE, "MODEL__DENSE_SEG__WINDOW_MERGE": "patch"}),
    "dense slide PAMR area+background rules": (tiny_cfg, {
        **_SLIDE, "MODEL__DENSE_SEG__PAMR_ITERS": 2, "MODEL__DENSE_SEG__PAMR_DILATIONS": [1, 2],
        "MODEL__DENSE_SEG__BG_THRESHOLD": 0.05, "MODEL__DENSE_SEG__AREA_THRESHOLD": 0.03}),
    "mask output resolution": (tiny_mask_cfg, {"MODEL__MASK_SEG__TEST__INSTANCE_ON": True}),
    "mask mask resolution": (tiny_mask_cfg, {"MODEL__MASK_SEG__TEST__SEMANTIC_RESOLUTION": "mask",
                                             "MODEL__MASK_SEG__TEST__PANOPTIC_ON": False}),
}
NUM_CLASSES = 40  # more than PAMR's 16 neighbour weights and the 8 queries, which do not grow with C
VOCABULARY = ",".join(["sky|heaven"] + [f"thing {i}" for i in range(NUM_CLASSES - 2)] + ["background"])


def build(case: str, output: str):
    make, opts = CASES[case]
    torch.manual_seed(0)
    model = build_model(make(MODEL__TEXT__VOCABULARY=VOCABULARY, MODEL__SEM_SEG_OUTPUT=output,
                             MODEL__TEXT__TEMPLATES="single", **opts)).eval()
    if make is tiny_mask_cfg:  # random weights: every query sure of its own class, so that many classes win pixels
        classify = model.class_probabilities

        def confident(*args, **kwargs):
            probs = classify(*args, **kwargs)
            q = probs.shape[1]
            return 0.2 * probs + 0.8 * torch.eye(q, probs.shape[2], device=probs.device)[None]

        model.class_probabilities = confident
    return model


def run(model, out_size):
    image = torch.randint(0, 255, (3, 56, 72), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    with torch.no_grad():
        return model([{"image": image, "height": out_size[0], "width": out_size[1]}])[0]["sem_seg"]


class LargestFloatTensor(TorchDispatchMode):
    """Records the most elements of any floating-point tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("case", list(CASES))
def test_labels_are_the_argmax_of_the_scores_without_a_full_resolution_class_tensor(case, monkeypatch):
    out_size = (90, 120)
    full = NUM_CLASSES * out_size[0] * out_size[1]
    # the 847-class, 2000x1500 case scaled down: bands and class chunks at 1/16 of a (C, H, W) tensor
    monkeypatch.setattr(post, "BAND_ELEMENTS", full // 16)
    monkeypatch.setattr(dense_module, "_CHUNK_ELEMENTS", full // 16)
    out, largest = {}, {}
    for output in ("scores", "labels"):
        model = build(case, output)
        run(model, (8, 8))  # the text embeddings, cached per model, are no part of the image path
        with LargestFloatTensor() as probe:
            out[output] = run(model, out_size)
        largest[output] = probe.largest
    scores, labels = out["scores"], out["labels"]
    assert scores.shape == (NUM_CLASSES, *out_size) and labels.shape == out_size and labels.dtype == torch.long
    assert len(labels.unique()) >= 3  # a real argmax, not a constant map
    assert torch.equal(labels, scores.argmax(0))
    assert largest["scores"] >= full  # the probe sees the (C, H, W) scores when they are asked for
    assert largest["labels"] < full // 2


def test_padded_resolution_cannot_give_labels():
    with pytest.raises(ValueError, match="SEMANTIC_RESOLUTION"):
        build_model(tiny_mask_cfg(MODEL__SEM_SEG_OUTPUT="labels",
                                  MODEL__MASK_SEG__TEST__SEMANTIC_RESOLUTION="padded"))
    with pytest.raises(ValueError, match="SEM_SEG_OUTPUT"):
        build_model(tiny_cfg(MODEL__SEM_SEG_OUTPUT="argmax"))


def test_predictor_reads_a_label_map():
    import numpy as np

    from ovseg import Predictor

    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    out = {}
    for output in ("scores", "labels"):
        torch.manual_seed(0)
        cfg = tiny_cfg(MODEL__SEM_SEG_OUTPUT=output, INPUT__MIN_SIZE_TEST=48)
        out[output] = Predictor(cfg, vocabulary="a,b,c")(image)
    assert out["labels"].outputs["sem_seg"].dim() == 2
    assert torch.equal(out["labels"].sem_seg, out["scores"].sem_seg)
