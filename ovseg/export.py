"""Export a model with its vocabulary baked in: a `torch.export` program (.pt2) and an ONNX model.

    from ovseg.export import export_model
    paths = export_model("naclip_vitb16", vocabulary="cat,dog,sky", output="out/naclip",
                         opts=["MODEL.DENSE_SEG.INFERENCE_MODE", "whole"])

Both files take one image tensor (1, 3, H, W), float32 0-255 in the config's INPUT.FORMAT channel order (RGB for
the shipped configs), of any height and width from `metadata["min_size"]` up (no resize inside: resize it as
INPUT.MIN_SIZE_TEST says first, if wanted), and return, at (H, W):
  - "sem_seg": (1, C, H, W) float32 class scores, the model's `sem_seg`;
  - "labels": (1, H, W) int64, their argmax;
  and for the mask segmentor (`OpenVocabMaskSegmentor`) also
  - "pred_masks": (1, Q, h, w) float32 mask logits on the mask grid of the input padded to the patch size;
  - "class_probs": (1, Q, C + 1) float32 class probabilities of each query (last = void),
  from which `panoptic_from_outputs` gives the model's `panoptic_seg` outside the graph.
The text embeddings of the vocabulary are constants of the graph: another vocabulary needs another export.
A JSON file beside them (`<output>.json`) names the classes, the outputs and what post-processing needs.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.config import CfgNode
from torch import nn

from .modeling.classifiers import ClassText
from .modeling.meta_arch import CLIPDenseSegmentor, OpenVocabMaskSegmentor, OpenVocabModel
from .modeling.meta_arch.dense_segmentor import QueryGroups
from .modeling.meta_arch.mask_segmentor import semantic_scores
from .modeling.postprocessing import OutputMasks, panoptic_inference

__all__ = ["DenseSegmentorExport", "MaskSegmentorExport", "ExportedFiles", "compare_with_eager", "export_model",
           "export_module", "panoptic_from_outputs", "padded_size"]

DENSE_OUTPUTS = ("sem_seg", "labels")
MASK_OUTPUTS = DENSE_OUTPUTS + ("pred_masks", "class_probs")
MAX_SIDE = 16384  # upper bound of the dynamic height and width
FORMAT = "ovseg-export/1"  # the metadata layout


class DenseSegmentorExport(nn.Module):
    """`CLIPDenseSegmentor` on one image with a fixed vocabulary: (1, 3, H, W) 0-255 -> (sem_seg, labels)."""

    def __init__(self, model: CLIPDenseSegmentor):
        super().__init__()
        if model.inference_mode != "whole":
            # the window grid of slide inference is Python arithmetic on the image size, fixed at export
            raise ValueError(f"MODEL.DENSE_SEG.INFERENCE_MODE={model.inference_mode!r} cannot be exported for any "
                             "image size; export with MODEL.DENSE_SEG.INFERENCE_MODE whole")
        if model.area_threshold > 0:
            raise ValueError(f"MODEL.DENSE_SEG.AREA_THRESHOLD={model.area_threshold}: the area rule is not "
                             "exportable (its class areas are counted on the host); set it to 0")
        text, owner = model.queries()
        self.model = image_path_only(model)
        self.register_buffer("text", text.detach().float().clone())  # (S, D): constants of the graph
        self.groups = QueryGroups.of(owner, len(text))  # Python ints: no host reads inside the graph

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(1, 3, H, W) float 0-255 -> (1, C, H, W) scores, (1, H, W) int64 labels."""
        # all classes at once: the class chunks of `segment` would be fixed by the example image's size
        probs = self.model.segment(self.model.normalize(image[0]), self.text, None, self.groups, chunk_elements=None)
        return probs[None], probs.argmax(0)[None]


class MaskSegmentorExport(nn.Module):
    """`OpenVocabMaskSegmentor` on one image with a fixed vocabulary: (1, 3, H, W) 0-255 -> (sem_seg, labels,
    pred_masks, class_probs)."""

    def __init__(self, model: OpenVocabMaskSegmentor):
        super().__init__()
        text = model.text_embeddings(model.vocabulary)
        self.model = image_path_only(model)
        self.num_classes = text.num_classes
        self.register_buffer("text", text.embeds.detach().float().clone())  # (S, D)
        self.register_buffer("owner", None if text.owner is None else text.owner.detach().long().clone())
        self.register_buffer("seen", model.seen.clone())  # (C,) bool: the ensemble weights of each class

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(1, 3, H, W) float 0-255 -> (1, C, H, W) scores, (1, H, W) labels, (1, Q, h, w) mask logits,
        (1, Q, C + 1) class probabilities."""
        h, w = image.shape[-2:]
        # padded here rather than through detectron2's ImageList, whose size arithmetic torch.export cannot follow
        padded = self.model.backbone.pad(self.model.normalize(image))
        out = self.model.segment(padded, ClassText(self.text, self.num_classes, self.owner), image_sizes=[(h, w)],
                                 seen=self.seen)
        probs, masks = out["class_probs"], out["pred_masks"]
        m = self.model
        scores = semantic_scores(probs[0], masks[0], tuple(padded.shape[-2:]), (h, w), (h, w), m.semantic_resolution,
                                 m.panoptic_on or m.instance_on)
        return scores[None], scores.argmax(0)[None], masks, probs


def image_path_only(model: OpenVocabModel) -> OpenVocabModel:
    """A shallow copy of `model` sharing its parameters, without the text tower and the training losses: what an
    exported program holds (torch.export keeps every parameter of the module it is given, used or not)."""
    core = copy.copy(model)
    core._modules = {k: v for k, v in model._modules.items() if k not in ("text_classifier", "criterion")}
    core.text_classifier = None
    return core


def export_module(model: OpenVocabModel) -> nn.Module:
    """The export wrapper of a model, its vocabulary fixed to the model's current one."""
    if isinstance(model, CLIPDenseSegmentor):
        return DenseSegmentorExport(model).eval()
    if isinstance(model, OpenVocabMaskSegmentor):
        return MaskSegmentorExport(model).eval()
    raise TypeError(f"{type(model).__name__} cannot be exported: ovseg exports CLIPDenseSegmentor and "
                    "OpenVocabMaskSegmentor")


def padded_size(image_size: Sequence[int], patch_size: int) -> Tuple[int, int]:
    """The (H, W) the model pads an image to: the next multiples of the patch size."""
    return tuple(-(-int(s) // patch_size) * patch_size for s in image_size)


def panoptic_from_outputs(class_probs, pred_masks, image_size: Sequence[int], is_thing: Sequence[bool],
                          patch_size: int, object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8,
                          output_size: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, List[Dict]]:
    """The model's `panoptic_seg` from an exported mask segmentor's outputs (outside the graph).

    Args:
        class_probs: (1, Q, C + 1) or (Q, C + 1) "class_probs" (tensor or numpy array).
        pred_masks: (1, Q, h, w) or (Q, h, w) "pred_masks".
        image_size: the (H, W) of the image given to the exported model.
        is_thing, patch_size, object_mask_threshold, overlap_threshold: as in the export's metadata
            (`metadata["is_thing"]`, `["patch_size"]`, `["panoptic"]`).
        output_size: (height, width) of the result; default: `image_size`.
    Returns:
        (H, W) int32 segment ids (0 = none) and detectron2's segments_info, as `OpenVocabMaskSegmentor` returns.
    """
    probs, masks = torch.as_tensor(class_probs), torch.as_tensor(pred_masks)
    probs, masks = (probs[0], masks[0]) if masks.dim() == 4 else (probs, masks)
    if probs.dim() != 2 or masks.dim() != 3 or len(probs) != len(masks):
        raise ValueError(f"expected class_probs (Q, C + 1) and pred_masks (Q, h, w) of one image, got "
                         f"{tuple(probs.shape)} and {tuple(masks.shape)}")
    if len(is_thing) != probs.shape[1] - 1:
        raise ValueError(f"is_thing has {len(is_thing)} entries for {probs.shape[1] - 1} classes")
    image_size = tuple(int(s) for s in image_size)
    out = OutputMasks(masks, padded_size(image_size, patch_size), image_size, tuple(output_size or image_size))
    return panoptic_inference(probs, out, torch.as_tensor(list(is_thing), dtype=torch.bool), object_mask_threshold,
                              overlap_threshold)


def compare_with_eager(model: OpenVocabModel, files: "ExportedFiles", sizes: Sequence[Tuple[int, int]],
                       seed: int = 0) -> Dict[str, float]:
    """Max |exported - eager| of the semantic scores (and the share of equal labels) on random images of `sizes`:
    the ONNX model under onnxruntime and the reloaded .pt2 program, against `model` called as detectron2 does."""
    torch.manual_seed(seed)
    diffs = {"onnx": 0.0, "program": 0.0, "onnx_labels_equal": 1.0}
    session = program = None
    if files.onnx is not None:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(files.onnx), providers=["CPUExecutionProvider"])
    if files.program is not None:
        program = torch.export.load(files.program).module()
    for size in sizes:
        image = torch.rand(1, 3, *size) * 255
        with torch.no_grad():
            ref = model([{"image": image[0]}])[0]["sem_seg"]
            if program is not None:
                diffs["program"] = max(diffs["program"], float((program(image)[0][0] - ref).abs().max()))
        if session is not None:
            scores, labels = session.run(DENSE_OUTPUTS, {"image": image.numpy()})
            diffs["onnx"] = max(diffs["onnx"], float((torch.from_numpy(scores[0]) - ref).abs().max()))
            same = float((torch.from_numpy(labels[0]) == ref.argmax(0)).float().mean())
            diffs["onnx_labels_equal"] = min(diffs["onnx_labels_equal"], same)
    return diffs


@dataclass
class ExportedFiles:
    """Where `export_model` wrote, and what it wrote there."""
    program: Optional[Path]  # .pt2, torch.export.load
    onnx: Optional[Path]
    metadata: Path  # .json
    info: Dict


def _example_image(patch_size: int) -> torch.Tensor:
    # sides off the patch grid and unequal: nothing about the image size is true of this example only
    torch.manual_seed(0)
    return torch.rand(1, 3, 3 * patch_size + 2, 4 * patch_size + 6) * 255


def _size_range(program: torch.export.ExportedProgram) -> Tuple[List[int], List[int]]:
    """The (H, W) range the exported program accepts, as torch.export refined it (the model's own limits)."""
    image = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "image")
    lows, highs = [], []
    for side in image.meta["val"].shape[-2:]:
        vr = program.range_constraints[side.node.expr]
        lows.append(int(vr.lower))
        highs.append(int(vr.upper))
    return lows, highs


def _metadata(model: OpenVocabModel, cfg: Optional[CfgNode], outputs: Sequence[str], sizes) -> Dict:
    vocab = model.vocabulary
    info = {
        "format": FORMAT,
        "meta_architecture": type(model).__name__,
        "classes": vocab.names,
        "synonyms": [list(c) for c in vocab.classes],
        "is_thing": [bool(t) for t in model.is_thing.tolist()],
        "input": "image: (1, 3, H, W) float32 0-255",
        "input_format": cfg.INPUT.FORMAT if cfg is not None else "RGB",
        "min_size": sizes[0],
        "max_size": sizes[1],
        "outputs": list(outputs),
        "patch_size": model.backbone.patch_size,
    }
    if cfg is not None:
        info["test_resize"] = {"min_size_test": cfg.INPUT.MIN_SIZE_TEST, "max_size_test": cfg.INPUT.MAX_SIZE_TEST}
    if isinstance(model, OpenVocabMaskSegmentor):
        info["panoptic"] = {"object_mask_threshold": model.object_mask_threshold,
                            "overlap_threshold": model.overlap_threshold}
    return info


def export_model(model: Union[OpenVocabModel, str, os.PathLike, CfgNode], output: Union[str, os.PathLike],
                 vocabulary=None, weights: Optional[str] = None, opts: Sequence[str] = (), onnx: bool = True,
                 program: bool = True, opset: Optional[int] = None, cfg: Optional[CfgNode] = None) -> ExportedFiles:
    """Write `<output>.pt2` (torch.export), `<output>.onnx` and `<output>.json` (metadata) for one vocabulary.

    Args:
        model: a built model, or a config (a shipped config's name, a yaml path, a CfgNode) built on the CPU in
            float32 as `ovseg.Predictor` builds it (with `weights` and `opts`).
        output: path prefix of the files (its folder is created).
        vocabulary: the classes baked in (a "cat,sofa|couch" string, a list, a file, a dataset name); default:
            the model's current / the config's vocabulary.
        onnx, program: which files to write.
        opset: ONNX opset (default: torch's).
        cfg: the config a built `model` comes from (its input format and test resize go into the metadata).
    """
    if not isinstance(model, nn.Module):
        from .predictor import Predictor  # the predictor's config resolution, weights and vocabulary rules

        predictor = Predictor(model, weights=weights, device="cpu", dtype="fp32", opts=opts, vocabulary=vocabulary)
        model, cfg = predictor.model, predictor.cfg
    elif vocabulary is not None:
        model.set_vocabulary(vocabulary)
    elif weights is not None or opts:
        raise ValueError("weights / opts apply to a config; load them into a built model yourself")
    model = model.float().eval()
    wrapper = export_module(model)
    outputs = MASK_OUTPUTS if isinstance(model, OpenVocabMaskSegmentor) else DENSE_OUTPUTS
    side = torch.export.Dim.DYNAMIC(min=model.backbone.patch_size, max=MAX_SIDE)
    with torch.no_grad():
        ep = torch.export.export(wrapper, (_example_image(model.backbone.patch_size),),
                                 dynamic_shapes={"image": {2: side, 3: side}})
    info = _metadata(model, cfg, outputs, _size_range(ep))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    paths = {"program": None, "onnx": None}
    if program:
        paths["program"] = output.with_name(output.name + ".pt2")
        torch.export.save(ep, paths["program"])
    if onnx:
        paths["onnx"] = output.with_name(output.name + ".onnx")
        # the dynamo exporter (the TorchScript one cannot translate aten::_native_multi_head_attention)
        torch.onnx.export(ep, (_example_image(model.backbone.patch_size),), paths["onnx"], dynamo=True,
                          input_names=["image"], output_names=list(outputs), opset_version=opset,
                          external_data=False, verbose=False)
    meta = output.with_name(output.name + ".json")
    meta.write_text(json.dumps(info, indent=1))
    return ExportedFiles(paths["program"], paths["onnx"], meta, info)
