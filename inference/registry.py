"""Models are data: a registry entry names the architecture, input size, normalization, weights and
labels, and load_pipeline is the one explicit step that reads files and moves models to a device.

Detectors follow torchvision's detection convention: a list of float (3, H, W) images in [0, 1],
normalized inside the model, returning one {"boxes", "scores", "labels"} dict per image in the
pixels of the image it was given. Classifiers take a normalized (N, 3, H, W) batch and return
logits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torchvision
from torch import nn

from inference import weights as W
from inference.pipeline_spec import ModelSource, PipelineSpec
from inference.taxonomy import AnswerPolicy
from inference.weight_store import fetch, hash_location, is_local, without_query

Role = Literal["detector", "classifier"]
CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConstantBoxes(nn.Module):
    """A detector that costs nothing: `boxes` fixed boxes on a grid over every image.

    It is the stand-in for measuring the overhead of everything that is not the model (fetch,
    decode, crops, queueing, the database): TRAPQ_DETECTOR=constant_boxes.
    """

    def __init__(self, num_classes: int = 2, boxes: int = 20) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.boxes = boxes

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """One output per image; images of one size share it (made once, never written)."""
        return [self._grid(image.shape[-2], image.shape[-1], image.device) for image in images]

    @functools.lru_cache(maxsize=16)  # noqa: B019 (a handful of sizes, for the model's life)
    def _grid(self, h: int, w: int, device: torch.device) -> dict[str, torch.Tensor]:
        cols = max(1, math.ceil(math.sqrt(self.boxes)))  # 0 boxes: an empty grid
        rows = max(1, math.ceil(self.boxes / cols))
        cell = torch.arange(self.boxes, device=device)
        x1 = (cell % cols).float() * (w / cols)
        y1 = torch.div(cell, cols, rounding_mode="floor").float() * (h / rows)
        boxes = torch.stack([x1, y1, x1 + w / cols, y1 + h / rows], dim=1)
        scores = torch.linspace(1.0, 0.5, self.boxes, device=device)
        labels = torch.ones(self.boxes, dtype=torch.int64, device=device)
        return {"boxes": boxes, "scores": scores, "labels": labels}


class ConstantLogits(nn.Module):
    """A classifier that costs nothing: the same logits for every crop (class i scores -i, so
    its top-k is classes 0..k-1). With constant_boxes and an 8 px crop it leaves a worker only
    the host's work: TRAPQ_CLASSIFIER=constant_classifier (bench.worker)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("logits", -torch.arange(num_classes, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


def _tv_detector(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def build(num_classes: int, **kwargs: Any) -> nn.Module:
        return fn(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)

    return build


def _tv_classifier(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def build(num_classes: int, **kwargs: Any) -> nn.Module:
        return fn(weights=None, num_classes=num_classes, **kwargs)

    return build


def _demo(name: str) -> Callable[..., nn.Module]:
    """The demo architectures live in their own module, imported only when a demo model is built."""

    def build(num_classes: int, **kwargs: Any) -> nn.Module:
        from inference import architectures

        return getattr(architectures, name)(num_classes=num_classes, **kwargs)

    return build


_det = torchvision.models.detection
_cls = torchvision.models
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "fasterrcnn_resnet50_fpn": _tv_detector(_det.fasterrcnn_resnet50_fpn),
    "fasterrcnn_resnet50_fpn_v2": _tv_detector(_det.fasterrcnn_resnet50_fpn_v2),
    "fasterrcnn_mobilenet_v3_large_fpn": _tv_detector(_det.fasterrcnn_mobilenet_v3_large_fpn),
    "fasterrcnn_mobilenet_v3_large_320_fpn": _tv_detector(
        _det.fasterrcnn_mobilenet_v3_large_320_fpn
    ),
    "retinanet_resnet50_fpn_v2": _tv_detector(_det.retinanet_resnet50_fpn_v2),
    "ssdlite320_mobilenet_v3_large": _tv_detector(_det.ssdlite320_mobilenet_v3_large),
    "resnet50": _tv_classifier(_cls.resnet50),
    "efficientnet_v2_s": _tv_classifier(_cls.efficientnet_v2_s),
    "convnext_tiny": _tv_classifier(_cls.convnext_tiny),
    "mobilenet_v3_large": _tv_classifier(_cls.mobilenet_v3_large),
    "tiny_detector": _demo("tiny_detector"),
    "tiny_classifier": _demo("tiny_classifier"),
    "constant_boxes": ConstantBoxes,
    "constant_logits": ConstantLogits,
}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    role: Role
    architecture: str  # key of ARCHITECTURES
    # detector: (shortest side, longest side) it is resized to; classifier: crop (height, width)
    input_size: tuple[int, int]
    num_classes: int  # used with random weights; a checkpoint's own count wins
    num_classes_key: str | None  # state-dict entry whose rows count the classes; None: no weights
    num_classes_divisor: int = 1  # anchors per location for heads that predict class x anchor
    mean: tuple[float, float, float] | None = IMAGENET_MEAN  # None: the model normalizes itself
    std: tuple[float, float, float] | None = IMAGENET_STD
    default_weights: str | None = None
    default_labels: str | None = None
    threshold_kwarg: str | None = None  # builder kwarg taking the detector's score threshold
    builder_kwargs: Mapping[str, Any] = field(default_factory=dict)
    # classifier: the last linear layer, whose input (the pooled penultimate features) is the
    # detection's embedding for tracking; None: the model gives no embedding
    embedding_layer: str | None = None


def _detector(
    name: str,
    size: tuple[int, int],
    key: str,
    divisor: int = 1,
    threshold: str = "box_score_thresh",
) -> ModelEntry:
    return ModelEntry(
        name, "detector", name, size, 91, key, divisor, None, None, threshold_kwarg=threshold
    )


def _classifier(name: str, size: int, key: str) -> ModelEntry:
    layer = key.removesuffix(".weight")
    return ModelEntry(name, "classifier", name, (size, size), 1000, key, embedding_layer=layer)


_FRCNN_KEY = "roi_heads.box_predictor.cls_score.weight"
REGISTRY: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in [
        _detector("fasterrcnn_resnet50_fpn", (800, 1333), _FRCNN_KEY),
        _detector("fasterrcnn_resnet50_fpn_v2", (800, 1333), _FRCNN_KEY),
        _detector("fasterrcnn_mobilenet_v3_large_fpn", (800, 1333), _FRCNN_KEY),
        _detector("fasterrcnn_mobilenet_v3_large_320_fpn", (320, 640), _FRCNN_KEY),
        _detector(
            "retinanet_resnet50_fpn_v2",
            (800, 1333),
            "head.classification_head.cls_logits.weight",
            divisor=9,
            threshold="score_thresh",
        ),
        _detector(
            "ssdlite320_mobilenet_v3_large",
            (320, 320),
            "head.classification_head.module_list.0.1.weight",
            divisor=6,
            threshold="score_thresh",
        ),
        _classifier("resnet50", 224, "fc.weight"),
        _classifier("efficientnet_v2_s", 384, "classifier.1.weight"),
        _classifier("convnext_tiny", 224, "classifier.2.weight"),
        _classifier("mobilenet_v3_large", 224, "classifier.3.weight"),
        ModelEntry(  # a tiny input: the frames' resize costs next to nothing as well
            "constant_boxes",
            "detector",
            "constant_boxes",
            (24, 32),
            2,
            None,
            mean=None,
            std=None,
            default_labels=None,
            builder_kwargs={"boxes": 20},
        ),
        ModelEntry(
            "constant_classifier",
            "classifier",
            "constant_logits",
            (8, 8),
            10,
            None,
            mean=None,
            std=None,
        ),
        ModelEntry(  # FCOS: no background class; sizes as in inference/architectures.py
            "demo_detector",
            "detector",
            "tiny_detector",
            (540, 960),
            2,
            "head.classification_head.cls_logits.weight",
            mean=None,
            std=None,
            default_weights=str(CHECKPOINTS / "demo_detector.pt"),
            default_labels=str(CHECKPOINTS / "demo_detector_labels.txt"),
        ),
        ModelEntry(
            "demo_classifier",
            "classifier",
            "tiny_classifier",
            (64, 64),
            2,
            "fc.weight",
            default_weights=str(CHECKPOINTS / "demo_classifier.pt"),
            default_labels=str(CHECKPOINTS / "demo_classifier_labels.txt"),
            embedding_layer="fc",
        ),
    ]
}


@dataclass
class LoadedModel:
    module: nn.Module
    entry: ModelEntry  # its registry entry
    source: ModelSource  # what was loaded: its name, weights' sha256 and labels
    num_classes: int | None

    @property
    def labels(self) -> tuple[str, ...]:
        return self.source.labels

    @property
    def version(self) -> str:
        """sha256[:12] of the weights; "random" or "builtin" without a weight file."""
        if self.source.sha256:
            return self.source.sha256[:12]
        return "builtin" if self.entry.num_classes_key is None else "random"

    def label(self, index: int) -> str:
        """Detector label files may leave out the background class 0; both layouts are read."""
        n, labels = self.num_classes, self.labels
        if 0 <= index < len(labels) and (n is None or len(labels) >= n):
            return labels[index]
        if self.entry.role == "detector" and n is not None and len(labels) == n - 1 and index >= 1:
            return labels[index - 1]
        return str(index)


@dataclass
class Pipeline:
    device: torch.device
    detector: LoadedModel
    classifier: LoadedModel
    filter: LoadedModel | None = None
    box_threshold: float = 0.5
    precision: str = "fp32"  # resolved once, by load_pipeline: bf16, fp16 or fp32
    top_k: int = 5
    filter_negative_label: str = "nonmoth"
    answers: AnswerPolicy | None = None  # taxa list and roll-up; a job's own may replace it

    @property
    def spec(self) -> PipelineSpec:
        """The spec of what this pipeline loaded and runs; its fingerprint is the job's check."""
        return PipelineSpec(
            detector=self.detector.source,
            classifier=self.classifier.source,
            filter=self.filter.source if self.filter else None,
            box_threshold=self.box_threshold,
            top_k=self.top_k,
            filter_negative_label=self.filter_negative_label,
            answers=self.answers,
        )

    def describe(self) -> dict[str, Any]:
        """One log line's worth: names and versions, where and how it runs, the fingerprint."""
        models = {"detector": self.detector, "classifier": self.classifier, "filter": self.filter}
        return {
            **{role: m and f"{m.entry.name}@{m.version}" for role, m in models.items()},
            "device": str(self.device),
            "precision": self.precision,
            "box_threshold": self.box_threshold,
            "top_k": self.top_k,
            "fingerprint": self.spec.fingerprint(),
        }


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def _entry(name: str, role: Role) -> ModelEntry:
    entry = REGISTRY.get(name)
    if entry is None:
        raise W.WeightsError(f"unknown model '{name}'; known: {', '.join(sorted(REGISTRY))}")
    if entry.role != role:
        raise W.WeightsError(f"'{name}' is a {entry.role}, not a {role}")
    return entry


def model_source(
    name: str,
    role: Role,
    *,
    weights: str = "",
    labels: str = "",
    sha256: str = "",
    random_weights: bool = False,
    cache_dir: Path | None = None,
    input_size: tuple[int, int] | None = None,
) -> ModelSource:
    """Find a model's weights and labels and hash the weights' bytes; builds nothing. What
    `trapq pipelines add` records: the weights' location as given (a local path made
    absolute, a URL, an s3:// URI), from which any worker fetches them by their sha256.

    `input_size` overrides the registry entry's (a resnet50 trained at 128 px runs at 128).

    `weights` and `labels` default to the registry's; a URL or S3 object is downloaded once
    into `cache_dir`. `sha256`, when given, pins the weights: other bytes are refused.
    """
    entry = _entry(name, role)
    label_file = labels or ("" if random_weights else entry.default_labels or "")
    label_names = tuple(W.load_labels(label_file)) if label_file else ()
    location = weights or entry.default_weights
    size = tuple(input_size) if input_size else entry.input_size
    if entry.num_classes_key is None or random_weights:
        return ModelSource(name, "", label_names, size, None)  # type: ignore[arg-type]
    if not location:
        raise W.WeightsError(f"'{name}' needs weights: give a file or URL")
    digest, path = hash_location(location, cache_dir, sha256 or None)
    if sha256 and digest != sha256.strip().lower():
        raise W.WeightsError(
            f"sha256 mismatch for {location}: expected {sha256}, file has {digest}; "
            "the file is corrupt or not the one you meant"
        )
    # A query string may be a signature (a presigned URL): never recorded. Workers then find
    # the bytes in their weights cache, or at a location that needs no secret (s3://).
    recorded = str(path.resolve()) if is_local(location) else without_query(location)
    return ModelSource(name, recorded, label_names, size, digest)  # type: ignore[arg-type]


def load_model(
    source: ModelSource,
    role: Role,
    device: torch.device,
    *,
    cache_dir: Path | None = None,
    **kwargs: Any,
) -> LoadedModel:
    """Build the model of `source` on `device`, its weights fetched from their location
    (inference.weight_store; downloads kept in `cache_dir`). They must still hash to
    source.sha256, so the pipeline's spec names the bytes actually loaded."""
    entry = _entry(source.name, role)
    builder = ARCHITECTURES[entry.architecture]
    build_kwargs = {**entry.builder_kwargs, **kwargs}
    if source.sha256 is None:
        # Seeded, so every worker process of a job builds the same random model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = builder(num_classes=entry.num_classes, **build_kwargs)
        return _ready(LoadedModel(module, entry, source, entry.num_classes), device)
    ckpt = W.load_checkpoint(fetch(source.weights, source.sha256, cache_dir), source.sha256)
    if ckpt.scripted is not None:
        n = len(source.labels) or None
        return _ready(LoadedModel(ckpt.scripted, entry, source, n), device)
    assert ckpt.state_dict is not None and entry.num_classes_key is not None
    n = W.num_classes(
        ckpt.state_dict, entry.num_classes_key, entry.num_classes_divisor, source.weights
    )
    module = builder(num_classes=n, **build_kwargs)
    try:
        module.load_state_dict(ckpt.state_dict)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise W.WeightsError(
            f"{source.weights} does not fit {entry.architecture}: {first}"
        ) from None
    return _ready(LoadedModel(module, entry, source, n), device)


def _ready(model: LoadedModel, device: torch.device) -> LoadedModel:
    model.module.eval().to(device)
    if model.entry.role == "classifier" and not isinstance(model.module, torch.jit.ScriptModule):
        model.module.to(memory_format=torch.channels_last)
    return model


def threshold_kwargs(name: str, box_threshold: float) -> dict[str, Any]:
    """Builder kwargs a detector takes from its pipeline: the score threshold, for registry
    detectors that apply it themselves."""
    kwarg = _entry(name, "detector").threshold_kwarg
    return {kwarg: box_threshold} if kwarg else {}


def load_pipeline(
    detector: ModelSource,
    classifier: ModelSource,
    filter: ModelSource | None = None,
    *,
    box_threshold: float = 0.5,
    top_k: int = 5,
    filter_negative_label: str = "nonmoth",
    answers: AnswerPolicy | None = None,
    device: str = "auto",
    precision: str = "auto",
    detector_kwargs: Mapping[str, Any] | None = None,
    cache_dir: Path | None = None,
) -> Pipeline:
    """The explicit I/O step: build the models of three sources and move them to the device.

    Precision is resolved here, once (auto: bf16 on CUDA, fp32 on CPU). detector_kwargs go to
    the architecture builder (e.g. box_detections_per_img, or boxes for constant_boxes).
    """
    dev = resolve_device(device)
    det_kwargs = {**threshold_kwargs(detector.name, box_threshold), **(detector_kwargs or {})}
    return Pipeline(
        dev,
        load_model(detector, "detector", dev, cache_dir=cache_dir, **det_kwargs),
        load_model(classifier, "classifier", dev, cache_dir=cache_dir),
        load_model(filter, "classifier", dev, cache_dir=cache_dir) if filter else None,
        box_threshold,
        resolve_precision(precision, dev),
        top_k,
        filter_negative_label,
        answers,
    )
