"""Test-time augmentation of the semantic output (`sem_seg`), as FC-CLIP and SAN ship it: every image is resized to
each of TEST.AUG.MIN_SIZES (shortest edge, longest capped at TEST.AUG.MAX_SIZE), optionally flipped left-right
(TEST.AUG.FLIP), the wrapped model runs on each version, and the (C, height, width) class scores are un-flipped and
averaged. Panoptic and instance outputs are not augmented: they come from one run on the unaugmented input."""
from typing import Dict, List, Sequence

import torch
from detectron2.config import configurable
from detectron2.data.transforms import ResizeShortestEdge
from torch import nn

__all__ = ["SegmentorWithTTA"]


def _resize_shortest_edge(image: torch.Tensor, min_size: int, max_size: int) -> torch.Tensor:
    """(C, H, W) image -> (C, H', W') with the shortest edge `min_size` and the longest at most `max_size`, by
    detectron2's `ResizeShortestEdge` (the rule of its test mapper and `DatasetMapperTTA`)."""
    hwc = image.permute(1, 2, 0).cpu().numpy()
    resized = ResizeShortestEdge(min_size, max_size).get_transform(hwc).apply_image(hwc)
    return torch.as_tensor(resized.transpose(2, 0, 1).copy(), device=image.device)


class SegmentorWithTTA(nn.Module):
    """Wraps an ovseg model (any detectron2 meta-architecture whose inference outputs ``{"sem_seg": (C, height,
    width)}``) with flip / multi-scale test-time augmentation of `sem_seg`, averaged at the score level. Inference
    only; takes and returns detectron2's batched inputs / outputs, so evaluators and `inference_on_dataset` use it
    in place of the model."""

    @configurable
    def __init__(self, model: nn.Module, *, min_sizes: Sequence[int], max_size: int, flip: bool):
        """
        Args:
            model: the segmentor; a `DistributedDataParallel` is unwrapped (inference needs no gradient sync).
            min_sizes: shortest-edge sizes to run at, e.g. (512, 640, 768).
            max_size: cap on the longest edge after resizing.
            flip: also run every scale flipped left-right.
        """
        super().__init__()
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        min_sizes = tuple(int(s) for s in min_sizes)
        if not min_sizes or min(min_sizes) <= 0:
            raise ValueError(f"TEST.AUG.MIN_SIZES must be a non-empty list of positive sizes, got {min_sizes}")
        if int(max_size) < max(min_sizes):
            raise ValueError(f"TEST.AUG.MAX_SIZE ({max_size}) is smaller than the largest of TEST.AUG.MIN_SIZES "
                             f"{min_sizes}")
        self.model = model
        self.min_sizes, self.max_size, self.flip = min_sizes, int(max_size), bool(flip)

    @classmethod
    def from_config(cls, cfg, model: nn.Module):
        aug = cfg.TEST.AUG
        return {"model": model, "min_sizes": aug.MIN_SIZES, "max_size": aug.MAX_SIZE, "flip": aug.FLIP}

    def augmentations(self):
        """The (min_size, flipped) pairs run for every image, in order."""
        return [(s, f) for s in self.min_sizes for f in ((False, True) if self.flip else (False,))]

    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        """Per image: `sem_seg` (C, height, width) float32, the mean of the un-flipped scores of every augmentation;
        any other output (panoptic_seg, instances) from the model run on the input as given."""
        if self.training:
            raise RuntimeError("SegmentorWithTTA is for inference: call .eval() first")
        with torch.no_grad():
            return [self._one_image(inp) for inp in batched_inputs]

    def _one_image(self, inp: Dict) -> Dict:
        # one image per run: a batch would pad images to a common size, and padding changes a mask model's scores
        height, width = inp.get("height", inp["image"].shape[-2]), inp.get("width", inp["image"].shape[-1])
        total = None  # the one (C, H, W) accumulator, added to in place
        other_outputs = False
        for min_size, flipped in self.augmentations():
            image = _resize_shortest_edge(inp["image"], min_size, self.max_size)
            out = self.model([{**inp, "image": image.flip(-1) if flipped else image, "height": height,
                               "width": width}])[0]
            if "sem_seg" not in out:
                raise ValueError(f"test-time augmentation (TEST.AUG.ENABLED) averages `sem_seg`, which "
                                 f"{type(self.model).__name__} does not output (it gives {sorted(out)})")
            other_outputs |= any(k != "sem_seg" for k in out)
            scores = out.pop("sem_seg")  # (C, height, width)
            if scores.dim() != 3:
                raise ValueError("test-time augmentation averages (C, H, W) scores: set MODEL.SEM_SEG_OUTPUT "
                                 f"'scores' (got a {tuple(scores.shape)} sem_seg)")
            del out
            if flipped:
                scores = scores.flip(-1)
            if total is None:
                total = scores.to(torch.float32, copy=True)
            else:
                total.add_(scores)
            del scores
        # panoptic / instance outputs are not augmented (as FC-CLIP): one plain run when the model makes any
        result = self.model([inp])[0] if other_outputs else {}
        result["sem_seg"] = total.div_(len(self.augmentations()))
        return result
