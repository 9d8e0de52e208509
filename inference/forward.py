"""One detector batch on the device: resize, detect, map boxes back, crop, classify, top-k.

Kept apart from the engine's threads and queues so that the numerics can be tested directly
(batched equals one at a time) and reused by the benchmark's model-only ceiling.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from inference.crops import crop_and_resize, normalize
from inference.registry import LoadedModel, Pipeline
from inference.types import Classification, Detection

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class AutocastBackbone(nn.Module):
    """Runs a detector's feature extractor in reduced precision and hands float32 features to
    its heads: the backbone is most of the compute, while bf16 in box decoding quantizes anchors
    to ~8 px at 1-2k px and makes batched_nms's coordinate offsets collapse boxes to points.
    Every torchvision detector has a `backbone` (ssdlite's has no out_channels: copied if there)."""

    def __init__(
        self, original: nn.Module, body: nn.Module, device_type: str, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.original = original  # uncompiled, so another engine can wrap it afresh
        self.body = body
        if hasattr(original, "out_channels"):
            self.out_channels = original.out_channels
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            self.device_type, dtype=self.dtype, enabled=self.dtype != torch.float32
        ):
            features = self.body(x)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        return OrderedDict((k, v.float()) for k, v in features.items())


@dataclass(frozen=True)
class ForwardOptions:
    """How fast, never what: precision, top-k and the filter's label are the pipeline's."""

    crop_batch_size: int = 256
    compile: bool = False


class BatchForward:
    def __init__(self, pipeline: Pipeline, options: ForwardOptions) -> None:
        self.pipeline = pipeline
        self.options = options
        self.device = pipeline.device
        self.dtype = DTYPES[pipeline.precision]
        self.detector = pipeline.detector.module
        self.classifier = pipeline.classifier.module
        self.filter = pipeline.filter.module if pipeline.filter else None
        # Only a torchvision-style `backbone` runs in reduced precision; a detector without one
        # (TorchScript, constant_boxes) runs wholly in float32.
        backbone = getattr(self.detector, "backbone", None)
        if isinstance(backbone, AutocastBackbone):
            backbone = backbone.original
        scripted = isinstance(self.detector, torch.jit.ScriptModule)
        if isinstance(backbone, nn.Module) and not scripted:
            backbone.to(memory_format=torch.channels_last)
            body = torch.compile(backbone) if options.compile else backbone
            self.detector.backbone = AutocastBackbone(backbone, body, self.device.type, self.dtype)
        if options.compile:
            self.classifier = torch.compile(self.classifier)
            if self.filter is not None:
                self.filter = torch.compile(self.filter)

    def __call__(self, images: list[torch.Tensor]) -> list[list[Detection]]:
        """uint8 (3, H, W) images on the device -> detections in their own pixels."""
        with torch.inference_mode():
            boxes, scores, labels = self.detect(images)
            crops = [
                crop_and_resize(img, b, self.pipeline.classifier.spec.input_size)
                for img, b in zip(images, boxes, strict=True)
            ]
            classes = self.classify(torch.cat(crops)) if crops else []
        return self._assemble(boxes, scores, labels, classes)

    def classify_boxes(
        self, images: list[torch.Tensor], given: list[Sequence[Detection]]
    ) -> list[list[Detection]]:
        """Re-classification: the crops of boxes found earlier (in original pixels) through the
        classifiers, the detector skipped. Each detection keeps its given box, detector score,
        label and source; only its classifications are new."""
        with torch.inference_mode():
            crops = [
                crop_and_resize(
                    img,
                    torch.tensor([[d.x1, d.y1, d.x2, d.y2] for d in boxes],
                                 dtype=torch.float32, device=img.device).reshape(-1, 4),
                    self.pipeline.classifier.spec.input_size,
                )
                for img, boxes in zip(images, given, strict=True)
            ]
            classes = self.classify(torch.cat(crops)) if crops else []
        out: list[list[Detection]] = []
        offset = 0
        for boxes in given:
            out.append([
                Detection(d.x1, d.y1, d.x2, d.y2, d.score, d.label,
                          classifications=classes[offset + i], source=d.source)
                for i, d in enumerate(boxes)
            ])
            offset += len(boxes)
        return out

    def detect(
        self, images: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Resizes on the device (antialiased; in uint8 on a CPU, 15x faster there than in float)
        so 4K frames never reach the model's own transform at full size, then scales each box
        back by its image's own factors."""
        spec = self.pipeline.detector.spec
        inputs, factors = [], []
        for img in images:
            h, w = img.shape[-2:]
            lo, hi = spec.input_size
            scale = min(lo / min(h, w), hi / max(h, w))
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            x = img.unsqueeze(0)
            if img.device.type != "cpu":  # CUDA interpolates floats only
                x = x.float()
            if (nh, nw) != (h, w):
                x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True)
            inputs.append(x[0].float().div_(255.0))
            factors.append(torch.tensor([w / nw, h / nh, w / nw, h / nh], device=img.device))
        with torch.autocast(self.device.type, enabled=False):  # heads, decoding, NMS: fp32
            outputs = self.detector(inputs)
        if isinstance(outputs, tuple):  # scripted torchvision detectors return (losses, detections)
            outputs = outputs[1]
        boxes, scores, labels = [], [], []
        threshold = self.pipeline.box_threshold
        for img, out, f in zip(images, outputs, factors, strict=True):
            keep = out["scores"] >= threshold
            h, w = img.shape[-2:]
            b = out["boxes"][keep].float() * f
            b[:, 0::2] = b[:, 0::2].clamp(0, w)
            b[:, 1::2] = b[:, 1::2].clamp(0, h)
            boxes.append(b)
            scores.append(out["scores"][keep].float())
            labels.append(out["labels"][keep])
        return boxes, scores, labels

    def classify(self, crops: torch.Tensor) -> list[list[Classification]]:
        """All crops of the batch in as few forwards as crop_batch_size allows; crops the filter
        calls negative skip the second classifier."""
        n = crops.shape[0]
        if n == 0:
            return []
        results: list[list[Classification]] = [[] for _ in range(n)]
        positive = torch.ones(n, dtype=torch.bool, device=crops.device)
        if self.filter is not None and self.pipeline.filter is not None:
            model = self.pipeline.filter
            probs = self._probabilities(self.filter, model, crops)
            for i, c in enumerate(self._top_k(probs, model)):
                results[i].append(c)
                positive[i] = c.label != self.pipeline.filter_negative_label
        index = positive.nonzero().flatten()
        if index.numel():
            model = self.pipeline.classifier
            probs = self._probabilities(self.classifier, model, crops[index])
            for i, c in zip(index.tolist(), self._top_k(probs, model), strict=True):
                results[i].append(c)
        return results

    def _probabilities(
        self, module: nn.Module, model: LoadedModel, crops: torch.Tensor
    ) -> torch.Tensor:
        out = []
        step = self.options.crop_batch_size
        for start in range(0, crops.shape[0], step):
            x = normalize(crops[start : start + step], model.spec.mean, model.spec.std)
            with self._autocast():
                logits = module(x)
            out.append(logits.float().softmax(dim=1))
        return torch.cat(out)

    def _top_k(self, probs: torch.Tensor, model: LoadedModel) -> list[Classification]:
        k = min(self.pipeline.top_k, probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        rows = []
        for vs, ix in zip(values.tolist(), indices.tolist(), strict=True):
            topk = [(model.label(i), v) for i, v in zip(ix, vs, strict=True)]
            rows.append(Classification(model.spec.name, topk[0][0], topk[0][1], topk))
        return rows

    def _assemble(
        self,
        boxes: list[torch.Tensor],
        scores: list[torch.Tensor],
        labels: list[torch.Tensor],
        classes: list[list[Classification]],
    ) -> list[list[Detection]]:
        det = self.pipeline.detector
        out: list[list[Detection]] = []
        offset = 0
        for b, s, lab in zip(boxes, scores, labels, strict=True):
            items = []
            for box, score, label in zip(b.tolist(), s.tolist(), lab.tolist(), strict=True):
                items.append(
                    Detection(
                        *box,
                        score=score,
                        label=det.label(int(label)),
                        classifications=classes[offset] if classes else [],
                    )
                )
                offset += 1
            out.append(items)
        return out

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)
