"""The base of ovseg's open-vocabulary models: CLIP towers, vocabulary state, preprocessing, output tasks.

Every meta-architecture here (`CLIPDenseSegmentor`, `OpenVocabMaskSegmentor`, `CLIPSelfDistiller`) derives from
`OpenVocabModel`, which owns, once:
  - the CLIP dense encoder (`backbone`) and text classifier (`text_classifier`), built from one CLIP load
    (`OpenVocabModel.clip_parts`);
  - the test vocabulary with its thing flags and seen classes, resolved lazily (a dataset registered after the model
    is built still works) and switched without a rebuild (`set_vocabulary`, `set_test_dataset`);
  - the training vocabulary, and with it the one rule for "seen" (`seen_mask`), which the evaluator's
    mIoU-seen / unseen uses too (`seen_for_dataset`);
  - normalisation and batching of detectron2 inputs (`preprocess`), `device`, and `output_tasks` (the evaluators).
Each model keeps a tensor-only core (`segment`) under its detectron2 `forward`, for export and other front-ends.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.data import DatasetCatalog
from detectron2.structures import ImageList
from torch import nn

from ...data.class_table import seen_class_mask
from ..backbone.clip_vit import CLIPViTDenseEncoder
from ..clip_model import load_clip_towers
from ..text import TextClassifier, Vocabulary, dataset_vocabulary, is_registered_dataset, parse_vocabulary

VocabularySpec = Union[str, Sequence[str], Vocabulary]
SEM_SEG_OUTPUTS = ("scores", "labels")  # MODEL.SEM_SEG_OUTPUT


def registered_dataset(name: str, key: str) -> str:
    """`name` if detectron2 knows the dataset, else a clear error naming the config key."""
    if name not in DatasetCatalog.list():
        close = [d for d in DatasetCatalog.list() if name.split("_")[0] in d][:10]
        raise KeyError(f"{key} names dataset {name!r}, which is not registered"
                       + (f"; similar registered names: {close}" if close else "")
                       + ". Register it (ovseg's dataset table or DatasetCatalog.register) or fix the name.")
    return name


def dataset_vocabularies(cfg) -> Dict[str, str]:
    """MODEL.TEXT.DATASET_VOCABULARIES ("<dataset>=<vocabulary>" entries) as {dataset name: vocabulary spec}."""
    out: Dict[str, str] = {}
    for entry in cfg.MODEL.TEXT.DATASET_VOCABULARIES:
        name, sep, spec = str(entry).partition("=")
        name, spec = name.strip(), spec.strip()
        if not sep or not name or not spec:
            raise ValueError(f"MODEL.TEXT.DATASET_VOCABULARIES: {entry!r} is not '<dataset>=<vocabulary>'")
        if name in out:
            raise ValueError(f"MODEL.TEXT.DATASET_VOCABULARIES names dataset {name!r} twice")
        out[name] = spec
    return out


def seen_mask(vocabulary: Vocabulary, train_vocabulary: Optional[Vocabulary]) -> torch.Tensor:
    """(C,) bool: which classes of `vocabulary` the model was trained on (`seen_class_mask`, the one rule);
    all False for a model without a training vocabulary."""
    if train_vocabulary is None:
        return torch.zeros(len(vocabulary), dtype=torch.bool)
    return torch.tensor(seen_class_mask(vocabulary.to_strings(), train_vocabulary.to_strings()), dtype=torch.bool)


def resolve_vocabulary(spec: VocabularySpec, dataset: Optional[str] = None, strict: bool = True,
                       is_thing: Optional[Sequence[bool]] = None) -> Tuple[Vocabulary, torch.Tensor]:
    """A vocabulary and its (C,) bool thing flags.

    Args:
        spec: a registered dataset name (its classes and thing flags; a dataset without thing metadata is all
            stuff), or a string / file / list (`parse_vocabulary`).
        dataset: the dataset a string / file / list vocabulary is given for (MODEL.TEXT.VOCABULARY while testing on
            it): its thing flags are taken when the class counts match.
        strict: a count mismatch with `dataset` is an error (evaluation); else the list counts as all things.
        is_thing: explicit flags, overriding the above.
    """
    if is_registered_dataset(spec):
        vocab, things = dataset_vocabulary(spec)
        things = things if things is not None else [False] * len(vocab)
    else:
        vocab = parse_vocabulary(spec)
        things = [True] * len(vocab)  # a user's list: every class may be an object
        if dataset is not None and is_registered_dataset(dataset):
            own, own_things = dataset_vocabulary(dataset)
            if len(own) == len(vocab):
                things = own_things if own_things is not None else [False] * len(vocab)
            elif strict:
                raise ValueError(
                    f"the vocabulary {spec if isinstance(spec, str) else '(list)'!r} has {len(vocab)} classes but "
                    f"dataset {dataset!r} has {len(own)}: a vocabulary given for a dataset (MODEL.TEXT.VOCABULARY) "
                    "must name its classes, one per class in the dataset's order"
                )
    if is_thing is not None:
        things = [bool(t) for t in is_thing]
        if len(things) != len(vocab):
            raise ValueError(f"is_thing has {len(things)} entries for {len(vocab)} classes")
    return vocab, torch.tensor(things, dtype=torch.bool)


class OpenVocabModel(nn.Module):
    """Base of the open-vocabulary meta-architectures (see the module docstring).

    Attributes:
        backbone: the CLIP dense encoder (`CLIPViTDenseEncoder`).
        text_classifier: the CLIP text tower turning vocabularies into (C, D) embeddings; None where a model is
            built for training only.
    """

    # MODEL.<section> whose TRAIN_VOCABULARY names the classes the model learns (`training_vocabulary_spec`)
    TRAIN_VOCABULARY_SECTION: Optional[str] = None

    def __init__(self, *, backbone: CLIPViTDenseEncoder, text_classifier: Optional[TextClassifier],
                 pixel_mean: Sequence[float], pixel_std: Sequence[float], vocabulary: Optional[VocabularySpec] = None,
                 vocabulary_dataset: Optional[str] = None, train_vocabulary: Optional[VocabularySpec] = None,
                 sem_seg_output: str = "scores"):
        """
        Args:
            backbone, text_classifier: the CLIP towers (`clip_parts`).
            pixel_mean, pixel_std: per-channel normalisation of the 0-255 RGB input.
            vocabulary: the initial test vocabulary (dataset name, string, file, list), resolved on first use.
            vocabulary_dataset: the dataset `vocabulary` is meant for (its thing flags when the counts match).
            train_vocabulary: the classes the model learns to name (labels index it); None = it learns none.
            sem_seg_output: "scores": `sem_seg` is (C, H, W) float32; "labels": (H, W) int64, their argmax over
                classes, computed without a full-resolution (C, H, W) tensor.
        """
        super().__init__()
        if sem_seg_output not in SEM_SEG_OUTPUTS:
            raise ValueError(f"MODEL.SEM_SEG_OUTPUT={sem_seg_output!r}; use one of {list(SEM_SEG_OUTPUTS)}")
        self.sem_seg_output = sem_seg_output
        self.backbone = backbone
        self.text_classifier = text_classifier
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        self._vocabulary_spec = (vocabulary, vocabulary_dataset)
        self._vocabulary: Optional[Vocabulary] = None
        self._is_thing: Optional[torch.Tensor] = None
        self._seen: Optional[torch.Tensor] = None
        self._train_vocabulary_spec = train_vocabulary
        self._train_vocabulary: Optional[Vocabulary] = None

    # ---- building from a config ---------------------------------------------------------------------------
    @staticmethod
    def clip_parts(cfg) -> Dict[str, Any]:
        """The keyword arguments every model shares: the CLIP towers from one load, the normalisation."""
        visual, text_model = load_clip_towers(cfg)
        return {
            "backbone": CLIPViTDenseEncoder(cfg, visual=visual),
            "text_classifier": TextClassifier(cfg, text_model=text_model),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @staticmethod
    def sem_seg_args(cfg) -> Dict[str, Any]:
        """The keyword arguments of the models with a `sem_seg` output."""
        return {"sem_seg_output": cfg.MODEL.SEM_SEG_OUTPUT}

    @staticmethod
    def check_scores_only(cfg) -> None:
        """Models whose `sem_seg` is always (C, H, W) scores refuse MODEL.SEM_SEG_OUTPUT "labels" rather than ignore
        it (the caller asked for no full-resolution class tensor)."""
        if cfg.MODEL.SEM_SEG_OUTPUT != "scores":
            raise ValueError(f"MODEL.SEM_SEG_OUTPUT={cfg.MODEL.SEM_SEG_OUTPUT!r} is not supported by "
                             f"{cfg.MODEL.META_ARCHITECTURE}, whose sem_seg is (C, H, W) scores: set it to 'scores' "
                             "('labels' is offered by CLIPDenseSegmentor and OpenVocabMaskSegmentor)")

    @classmethod
    def vocabulary_args(cls, cfg) -> Dict[str, Any]:
        """The test vocabulary keyword arguments of a config: MODEL.TEXT.VOCABULARY (for DATASETS.TEST[0]) or
        DATASETS.TEST[0]'s classes."""
        first_test = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None
        spec = cls.test_vocabulary_spec(cfg, first_test) if first_test else cfg.MODEL.TEXT.VOCABULARY or None
        return {"vocabulary": spec or first_test, "vocabulary_dataset": first_test}

    @staticmethod
    def test_vocabulary_spec(cfg, dataset_name: str) -> Optional[str]:
        """The names a config gives `dataset_name`'s classes when testing on it: MODEL.TEXT.VOCABULARY, else the
        dataset's MODEL.TEXT.DATASET_VOCABULARIES entry; None = the dataset's own names."""
        return cfg.MODEL.TEXT.VOCABULARY or dataset_vocabularies(cfg).get(dataset_name)

    @classmethod
    def training_vocabulary_spec(cls, cfg) -> Optional[VocabularySpec]:
        """The classes a model built from `cfg` learns to name; None for models that learn no class names
        (training-free ones, CLIPSelf's label-free distillation): the evaluator then reports the benchmark's
        reference split. Models that learn names set `TRAIN_VOCABULARY_SECTION` (their MODEL.<section>): its
        TRAIN_VOCABULARY, else DATASETS.TRAIN[0]'s MODEL.TEXT.DATASET_VOCABULARIES entry, else its classes."""
        if cls.TRAIN_VOCABULARY_SECTION is None:
            return None
        spec = cfg.MODEL[cls.TRAIN_VOCABULARY_SECTION].TRAIN_VOCABULARY
        if spec:
            return spec
        if not cfg.DATASETS.TRAIN:
            return None
        first = registered_dataset(cfg.DATASETS.TRAIN[0], "DATASETS.TRAIN")
        return dataset_vocabularies(cfg).get(first, first)

    @classmethod
    def check_training_sets(cls, cfg) -> None:
        """Labels index the training vocabulary: every DATASETS.TRAIN set must share one class list, and
        MODEL.<TRAIN_VOCABULARY_SECTION>.TRAIN_VOCABULARY, if given, must name as many classes (else the classes
        would be named wrongly). Clear errors for unregistered names."""
        train_names = [registered_dataset(n, "DATASETS.TRAIN") for n in cfg.DATASETS.TRAIN]
        if not train_names or cls.TRAIN_VOCABULARY_SECTION is None:
            return
        first = dataset_vocabulary(train_names[0])[0]
        for other in train_names[1:]:
            if dataset_vocabulary(other)[0] != first:
                raise ValueError(f"DATASETS.TRAIN: {other!r} has another vocabulary than {train_names[0]!r}; "
                                 "training sets must share their class list")
        key = f"MODEL.{cls.TRAIN_VOCABULARY_SECTION}.TRAIN_VOCABULARY"
        if not cfg.MODEL[cls.TRAIN_VOCABULARY_SECTION].TRAIN_VOCABULARY:
            key = f"MODEL.TEXT.DATASET_VOCABULARIES' entry for {train_names[0]!r}"
        spec = cls.training_vocabulary_spec(cfg)
        given = len(first) if spec == train_names[0] else len(parse_vocabulary(spec))
        if given != len(first):
            raise ValueError(f"{key} has {given} classes but DATASETS.TRAIN {train_names[0]!r} has {len(first)}: "
                             "give a list of its classes in its order, or set it \"\" to use the dataset's names")

    @classmethod
    def output_tasks(cls, cfg) -> Tuple[str, ...]:
        """The detectron2 output keys the model produces at test time (they pick the evaluators)."""
        return ("sem_seg",)

    @classmethod
    def seen_for_dataset(cls, cfg, dataset_name: str) -> Optional[List[bool]]:
        """Per class of `dataset_name`, whether a model built from `cfg` has seen it (what its `seen` is when
        tested there): the evaluator's seen / unseen split. None when the model has no training vocabulary."""
        train = cls.training_vocabulary_spec(cfg)
        if train is None:
            return None
        vocab, _ = resolve_vocabulary(cls.test_vocabulary_spec(cfg, dataset_name) or dataset_name, dataset_name)
        return seen_mask(vocab, parse_vocabulary(train)).tolist()

    # ---- vocabulary state --------------------------------------------------------------------------------
    def _resolve_initial(self) -> None:
        spec, dataset = self._vocabulary_spec
        if spec is None:
            raise ValueError("no vocabulary: set MODEL.TEXT.VOCABULARY or DATASETS.TEST, or call set_vocabulary()")
        self._set(*resolve_vocabulary(spec, dataset, strict=False))

    def _set(self, vocab: Vocabulary, is_thing: torch.Tensor) -> None:
        self._vocabulary, self._is_thing, self._seen = vocab, is_thing, None

    @property
    def vocabulary(self) -> Vocabulary:
        """The classes the model segments now."""
        if self._vocabulary is None:
            self._resolve_initial()
        return self._vocabulary

    @property
    def is_thing(self) -> torch.Tensor:
        """(C,) bool: which classes of `vocabulary` are things (panoptic / instance inference)."""
        if self._vocabulary is None:
            self._resolve_initial()
        return self._is_thing

    @property
    def train_vocabulary(self) -> Optional[Vocabulary]:
        """The training classes (labels index them), or None."""
        if self._train_vocabulary is None and self._train_vocabulary_spec is not None:
            self._train_vocabulary = parse_vocabulary(self._train_vocabulary_spec)
        return self._train_vocabulary

    @property
    def seen(self) -> torch.Tensor:
        """(C,) bool: which classes of `vocabulary` were trained on (`seen_mask`)."""
        if self._seen is None:
            self._seen = seen_mask(self.vocabulary, self.train_vocabulary)
        return self._seen

    def set_vocabulary(self, vocabulary: VocabularySpec, is_thing: Optional[Sequence[bool]] = None,
                       dataset: Optional[str] = None) -> Vocabulary:
        """Switch the classes to segment without rebuilding.

        Args:
            vocabulary: a registered dataset name (its classes and thing flags), or a string / file / list (all
                things, unless `dataset` or `is_thing` says otherwise).
            is_thing: per-class thing flags, overriding the others.
            dataset: the dataset a string / file / list is given for: its thing flags are taken, and a different
                class count is an error.
        """
        vocab, things = resolve_vocabulary(vocabulary, dataset, strict=True, is_thing=is_thing)
        self._set(vocab, things)
        return vocab

    def set_test_dataset(self, dataset_name: str, vocabulary: Optional[VocabularySpec] = None) -> Vocabulary:
        """Point the model at the dataset it is about to be evaluated on: the dataset's classes, or `vocabulary`
        (MODEL.TEXT.VOCABULARY: the same classes under other names) with the dataset's thing flags."""
        return self.set_vocabulary(vocabulary or dataset_name, dataset=dataset_name)

    # ---- inputs and text ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) 0-255 RGB -> normalised float on the model's device."""
        return (images.to(self.device).float() - self.pixel_mean) / self.pixel_std

    @staticmethod
    def check_image(image: torch.Tensor, min_size: int = 1) -> None:
        """One clear error for an input that is not a (3, H, W) image of at least `min_size` pixels a side."""
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) RGB image, got shape {tuple(image.shape)}")
        if min(image.shape[-2:]) < 1:
            raise ValueError(f"empty image of shape {tuple(image.shape)}")
        if min(image.shape[-2:]) < min_size:
            raise ValueError(f"image of size {tuple(image.shape[-2:])} is smaller than the CLIP patch size "
                             f"{min_size}: resize it (INPUT.MIN_SIZE_TEST / MIN_SIZE_TRAIN) before segmenting")

    def preprocess(self, batched_inputs: List[Dict], min_size: int = 1) -> ImageList:
        """detectron2 inputs -> normalised images padded (bottom / right) to the patch size, in one batch."""
        images = []
        for inp in batched_inputs:
            self.check_image(inp["image"], min_size)
            images.append(self.normalize(inp["image"]))
        return ImageList.from_tensors(images, size_divisibility=self.backbone.patch_size)

    def text_queries(self, vocabulary: Vocabulary, synonyms: str = "mean"
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(S, D) normalised text embeddings on the model's device and the (S,) class of each row: a row per
        synonym with `synonyms` "max" when a class has several, else a row per class (its synonyms' mean
        embedding) and owner None."""
        if self.text_classifier is None:
            raise RuntimeError(f"{type(self).__name__} was built without a text classifier: it cannot classify")
        if synonyms == "max" and any(len(c) > 1 for c in vocabulary.classes):
            embeds, owner = self.text_classifier.synonym_embeddings(vocabulary)
            return embeds.to(self.device), owner.to(self.device)
        return self.text_classifier(vocabulary).to(self.device), None

    # ---- export -------------------------------------------------------------------------------------------
    def parameters_needing_weights(self, clip_pretrained: bool) -> List[str]:
        """Names of the trainable parameters that only MODEL.WEIGHTS can give: with CLIP weights loaded
        (`clip_pretrained`), the CLIP towers' own unlocked parameters start from them and are not counted."""
        clip = ("backbone.", "text_classifier.") if clip_pretrained else ()
        return [n for n, p in self.named_parameters() if p.requires_grad and not n.startswith(clip)]

    def open_clip_state_dict(self) -> Dict[str, torch.Tensor]:
        """The full open_clip state dict: the encoder's visual tower (as trained) + the text tower, on the CPU."""
        if self.text_classifier is None:
            raise RuntimeError("cannot export an open_clip checkpoint without the text tower")
        state = {f"visual.{k}": v for k, v in self.backbone.tower.visual.state_dict().items()}
        state.update(self.text_classifier.text_model.state_dict())
        return {k: v.detach().cpu().clone() for k, v in state.items()}
