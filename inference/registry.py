"""Models are data: a registry entry names the architecture, input size, normalization, weights and
labels, and load_pipeline is the one explicit step that reads files and moves models to a device.

Detectors follow torchvision's detection convention: a list of float (3, H, W) images in [0, 1],
normalized inside the model, returning one {"boxes", "scores", "labels"} dict per image in the
pixels of the image it was given. Classifiers take a normalized (N, 3, H, W) batch and return
logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torchvision
from torch import nn

from inference import weights as W

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
        cols = math.ceil(math.sqrt(self.boxes))
        rows = math.ceil(self.boxes / cols)
        out = []
        for image in images:
            h, w = image.shape[-2:]
            cell = torch.arange(self.boxes, device=image.device)
            x1 = (cell % cols).float() * (w / cols)
            y1 = torch.div(cell, cols, rounding_mode="floor").float() * (h / rows)
            boxes = torch.stack([x1, y1, x1 + w / cols, y1 + h / rows], dim=1)
            scores = torch.linspace(1.0, 0.5, self.boxes, device=image.device)
            labels = torch.ones(self.boxes, dtype=torch.int64, device=image.device)
            out.append({"boxes": boxes, "scores": scores, "labels": labels})
        return out


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
}


@dataclass(frozen=True)
class ModelSpec:
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


def _detector(
    name: str,
    size: tuple[int, int],
    key: str,
    divisor: int = 1,
    threshold: str = "box_score_thresh",
) -> ModelSpec:
    return ModelSpec(
        name, "detector", name, size, 91, key, divisor, None, None, threshold_kwarg=threshold
    )


def _classifier(name: str, size: int, key: str) -> ModelSpec:
    return ModelSpec(name, "classifier", name, (size, size), 1000, key)


_FRCNN_KEY = "roi_heads.box_predictor.cls_score.weight"
REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
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
        ModelSpec(
            "constant_boxes",
            "detector",
            "constant_boxes",
            (320, 640),
            2,
            None,
            mean=None,
            std=None,
            default_labels=None,
            builder_kwargs={"boxes": 20},
        ),
        ModelSpec(  # FCOS: no background class; sizes as in inference/architectures.py
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
        ModelSpec(
            "demo_classifier",
            "classifier",
            "tiny_classifier",
            (64, 64),
            2,
            "fc.weight",
            default_weights=str(CHECKPOINTS / "demo_classifier.pt"),
            default_labels=str(CHECKPOINTS / "demo_classifier_labels.txt"),
        ),
    ]
}


@dataclass
class LoadedModel:
    module: nn.Module
    spec: ModelSpec
    labels: list[str]
    version: str  # sha256[:12] of the weights, "random" or "builtin"
    num_classes: int | None

    def label(self, index: int) -> str:
        """Detector label files may leave out the background class 0; both layouts are read."""
        n, labels = self.num_classes, self.labels
        if 0 <= index < len(labels) and (n is None or len(labels) >= n):
            return labels[index]
        if self.spec.role == "detector" and n is not None and len(labels) == n - 1 and index >= 1:
            return labels[index - 1]
        return str(index)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "architecture": self.spec.architecture,
            "version": self.version,
            "num_classes": self.num_classes,
        }


@dataclass
class Pipeline:
    device: torch.device
    detector: LoadedModel
    classifier: LoadedModel
    filter: LoadedModel | None = None
    box_threshold: float = 0.5
    precision: str = "fp32"

    def describe(self) -> dict[str, Any]:
        return {
            "detector": self.detector.describe(),
            "classifier": self.classifier.describe(),
            "filter": self.filter.describe() if self.filter else None,
            "device": str(self.device),
            "precision": self.precision,
            "box_threshold": self.box_threshold,
        }


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def load_model(
    name: str,
    role: Role,
    device: torch.device,
    weights: str | None = None,
    labels: str | None = None,
    sha256: str | None = None,
    random_weights: bool = False,
    cache_dir: Path | None = None,
    **kwargs: Any,
) -> LoadedModel:
    spec = REGISTRY.get(name)
    if spec is None:
        raise W.WeightsError(f"unknown model '{name}'; known: {', '.join(sorted(REGISTRY))}")
    if spec.role != role:
        raise W.WeightsError(f"'{name}' is a {spec.role}, not a {role}")
    label_list = (
        W.load_labels(labels or spec.default_labels)
        if (labels or (spec.default_labels and not random_weights))
        else []
    )
    builder = ARCHITECTURES[spec.architecture]
    build_kwargs = {**spec.builder_kwargs, **kwargs}
    source = weights or spec.default_weights
    if spec.num_classes_key is None or random_weights or not source:
        if spec.num_classes_key is not None and not random_weights:
            raise W.WeightsError(f"'{name}' needs weights: give a file or URL")
        # Seeded, so every worker process of a job builds the same random model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = builder(num_classes=spec.num_classes, **build_kwargs)
        version = "builtin" if spec.num_classes_key is None else "random"
        return _ready(LoadedModel(module, spec, label_list, version, spec.num_classes), device)
    ckpt = W.load_checkpoint(W.resolve(source, cache_dir), sha256)
    if ckpt.scripted is not None:
        n = len(label_list) or None
        return _ready(LoadedModel(ckpt.scripted, spec, label_list, ckpt.sha256[:12], n), device)
    assert ckpt.state_dict is not None
    n = W.num_classes(ckpt.state_dict, spec.num_classes_key, spec.num_classes_divisor, source)
    module = builder(num_classes=n, **build_kwargs)
    try:
        module.load_state_dict(ckpt.state_dict)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise W.WeightsError(f"{source} does not fit {spec.architecture}: {first}") from None
    return _ready(LoadedModel(module, spec, label_list, ckpt.sha256[:12], n), device)


def _ready(model: LoadedModel, device: torch.device) -> LoadedModel:
    model.module.eval().to(device)
    if model.spec.role == "classifier" and not isinstance(model.module, torch.jit.ScriptModule):
        model.module.to(memory_format=torch.channels_last)
    return model


def load_pipeline(
    detector: str = "demo_detector",
    classifier: str = "demo_classifier",
    device: str = "auto",
    detector_weights: str | None = None,
    detector_labels: str | None = None,
    detector_sha256: str | None = None,
    classifier_weights: str | None = None,
    classifier_labels: str | None = None,
    classifier_sha256: str | None = None,
    filter_classifier: str | None = None,
    filter_weights: str | None = None,
    filter_labels: str | None = None,
    random_weights: bool = False,
    cache_dir: Path | None = None,
    box_threshold: float = 0.5,
    precision: str = "auto",
    detector_kwargs: Mapping[str, Any] | None = None,
) -> Pipeline:
    """The explicit I/O step: read weights and labels, build the models, move them to the device.

    detector_kwargs go to the architecture builder (e.g. box_detections_per_img, or boxes for
    constant_boxes).
    """
    dev = resolve_device(device)
    det_spec = REGISTRY.get(detector)
    det_kwargs = dict(detector_kwargs or {})
    if det_spec is not None and det_spec.threshold_kwarg:
        det_kwargs.setdefault(det_spec.threshold_kwarg, box_threshold)
    det = load_model(
        detector,
        "detector",
        dev,
        detector_weights,
        detector_labels,
        detector_sha256,
        random_weights,
        cache_dir,
        **det_kwargs,
    )
    cls = load_model(
        classifier,
        "classifier",
        dev,
        classifier_weights,
        classifier_labels,
        classifier_sha256,
        random_weights,
        cache_dir,
    )
    flt = (
        load_model(
            filter_classifier,
            "classifier",
            dev,
            filter_weights,
            filter_labels,
            None,
            random_weights,
            cache_dir,
        )
        if filter_classifier
        else None
    )
    return Pipeline(dev, det, cls, flt, box_threshold, resolve_precision(precision, dev))
