"""Reusable open-vocabulary predictor + visualisation (the demo's engine, usable from notebooks)."""
from __future__ import annotations

import hashlib
from typing import Dict, List, Tuple

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import ColorMode, Visualizer

from ovseg.modeling.text import Vocabulary, parse_vocabulary


def random_colors(n: int, seed: int = 0) -> List[Tuple[int, int, int]]:
    rng = np.random.default_rng(seed)
    return [tuple(int(c) for c in rng.integers(40, 256, size=3)) for _ in range(n)]


def vocabulary_metadata(vocab: Vocabulary):
    """A detectron2 metadata entry naming the vocabulary's classes, for the Visualizer."""
    key = "__ovseg_vocab_" + hashlib.sha1("\n".join(vocab.to_strings()).encode()).hexdigest()[:12]
    meta = MetadataCatalog.get(key)
    if not meta.get("stuff_classes", None):
        meta.set(stuff_classes=vocab.names, stuff_colors=random_colors(len(vocab)),
                 thing_classes=vocab.names, thing_colors=random_colors(len(vocab)))
    return meta


class OVSegPredictor(DefaultPredictor):
    """DefaultPredictor (resize, BGR/RGB handling, weights from MODEL.WEIGHTS) with a switchable vocabulary."""

    def __init__(self, cfg, vocabulary):
        super().__init__(cfg)
        self.set_vocabulary(vocabulary)

    def set_vocabulary(self, vocabulary) -> Vocabulary:
        self.vocabulary = parse_vocabulary(vocabulary)
        self.model.set_vocabulary(self.vocabulary)
        if hasattr(self.model, "text_classifier"):
            with torch.no_grad():  # encode the prompts now, so per-image timings are the images' own
                self.model.text_classifier(self.vocabulary)
        self.metadata = vocabulary_metadata(self.vocabulary)
        return self.vocabulary

    def class_areas(self, predictions: Dict) -> Dict[str, float]:
        """Fraction of the image given to each class (sem_seg argmax), largest first."""
        labels = predictions["sem_seg"].argmax(0)
        counts = torch.bincount(labels.flatten(), minlength=len(self.vocabulary)).cpu().numpy()
        fractions = counts / max(labels.numel(), 1)
        order = np.argsort(-fractions)
        return {self.vocabulary.names[i]: float(fractions[i]) for i in order if counts[i] > 0}

    def visualize(self, image_bgr: np.ndarray, predictions: Dict) -> np.ndarray:
        """The image with the predicted segmentation drawn by detectron2's Visualizer (RGB array)."""
        vis = Visualizer(image_bgr[:, :, ::-1], self.metadata, instance_mode=ColorMode.IMAGE)
        if "panoptic_seg" in predictions:
            seg, info = predictions["panoptic_seg"]
            out = vis.draw_panoptic_seg(seg.cpu(), info)
        elif "sem_seg" in predictions:
            out = vis.draw_sem_seg(predictions["sem_seg"].argmax(0).cpu())
        else:
            out = vis.draw_instance_predictions(predictions["instances"].to("cpu"))
        return out.get_image()
