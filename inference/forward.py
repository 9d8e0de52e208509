"""One detector batch on the device: resize, detect, map boxes back, crop, classify, top-k,
and the species answer a taxa list and taxonomy allow (inference.rollup).

Kept apart from the engine's threads and queues so that the numerics can be tested directly
(batched equals one at a time) and reused by the benchmark's model-only ceiling.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference.crops import crop_batch, normalize
from inference.registry import LoadedModel, Pipeline
from inference.rollup import SOURCES, Rollup
from inference.types import Classification, Detection

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# A stored softmax costs 2 bytes a label: 8 KiB a detection at this many, about a resnet50
# embedding's 4 KiB twice over; beyond it (a 29,000-species head: 58 KiB) nothing is stored
# and re-applying a taxa list needs a re-classification run.
MAX_STORED_LABELS = 4096


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
    compile_backend: str = "inductor"  # torch.compile's; "eager" traces without code generation
    # Every detection's embedding (the species classifier's penultimate features) from the same
    # forward: the classifier then runs on the filter's negatives too, and they keep no labels.
    embeddings: bool = False
    # Every classification's full softmax (before any taxa list) as float16, so another list
    # or threshold can be applied later without the device (inference.reapply).
    probabilities: bool = False


class BatchForward:
    def __init__(self, pipeline: Pipeline, options: ForwardOptions) -> None:
        self.pipeline = pipeline
        self.options = options
        self.device = pipeline.device
        self.dtype = DTYPES[pipeline.precision]
        self.detector = pipeline.detector.module
        self.classifier = pipeline.classifier.module
        self.filter = pipeline.filter.module if pipeline.filter else None
        self._norms: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._names: dict[tuple[str, int], list[str]] = {}
        self._negatives: dict[tuple[str, int], torch.Tensor] = {}
        answers = pipeline.answers  # the taxa list and roll-up, on the device once
        self._rollup = Rollup(answers, self._species_labels(), self.device) if answers else None
        # Only a torchvision-style `backbone` runs in reduced precision; a detector without one
        # (TorchScript, constant_boxes) runs wholly in float32.
        backbone = getattr(self.detector, "backbone", None)
        if isinstance(backbone, AutocastBackbone):
            backbone = backbone.original
        scripted = isinstance(self.detector, torch.jit.ScriptModule)
        if isinstance(backbone, nn.Module) and not scripted:
            backbone.to(memory_format=torch.channels_last)
            body = self._compiled(backbone) if options.compile else backbone
            self.detector.backbone = AutocastBackbone(backbone, body, self.device.type, self.dtype)
        self._features = _Features.attach(pipeline.classifier) if options.embeddings else None
        if options.compile:
            self.classifier = self._compiled(self.classifier)
            if self.filter is not None:
                self.filter = self._compiled(self.filter)

    def _compiled(self, module: nn.Module) -> nn.Module:
        """Compiles lazily, at the first call: Engine.start() makes that call on a dummy batch,
        so a compiler that cannot work stops the worker there, not at its first capture."""
        return torch.compile(module, backend=self.options.compile_backend)  # type: ignore[return-value]

    def __call__(self, images: list[torch.Tensor]) -> list[list[Detection]]:
        """uint8 (3, H, W) images on the device -> detections in their own pixels."""
        return self.launch(images).detections()

    def launch(self, images: list[torch.Tensor]) -> Launched:
        """Queues a batch's work on the device and returns before its results exist.

        Per batch, whatever the number of images and boxes, this waits on the device once to
        route crops past the threshold (one nonzero) and once more with a filter (which crops
        the second classifier gets); everything else is tensor ops, and the results come back
        in one non-blocking copy (detections() reads them). Every box the detector returned is
        cropped and the threshold picks the crops to classify, so the crops of boxes below it
        are wasted: registry detectors apply the threshold themselves (threshold_kwarg), so
        there are none, while a per-image count of kept boxes would cost a sync per image.
        """
        with torch.inference_mode():
            found = self._detect(images)
            kept = found.keep.nonzero().flatten()
            size = self.pipeline.classifier.source.input_size
            crops = crop_batch(images, found.boxes, found.owners, found.spans(), size)
            n = found.boxes.shape[0]
            blocks, layout = self._route(crops.index_select(0, kept), kept, n)
            head = [
                found.keep[:, None].float(),
                found.boxes,
                found.scores[:, None],
                found.labels[:, None].float(),
            ]
            rows, ready = _to_host(torch.cat([*head, *blocks], dim=1))
        return Launched(rows, found.counts, ready, self.pipeline.detector, layout)

    def launch_given(
        self, images: list[torch.Tensor], given: list[Sequence[Detection]]
    ) -> Launched:
        """Re-classification, queued like launch(): the boxes found earlier (original pixels)
        are cropped and classified, the detector skipped. Every given box is kept, so nothing
        waits on the device at all (a filter's routing aside); each detection keeps its given
        box, score, label and source, with new classifications (and embedding)."""
        with torch.inference_mode():
            counts = [len(boxes) for boxes in given]
            table = [
                [d.x1, d.y1, d.x2, d.y2, d.score, i]
                for i, boxes in enumerate(given)
                for d in boxes
            ]
            values = _to_device(torch.tensor(table, dtype=torch.float32).reshape(-1, 6),
                                self.device)
            n = values.shape[0]
            boxes, owners = values[:, :4], values[:, 5]
            ends = list(itertools.accumulate(counts))
            spans = list(zip([0, *ends[:-1]], ends, strict=True))
            size = self.pipeline.classifier.source.input_size
            crops = crop_batch(images, boxes, owners, spans, size)
            blocks, layout = self._route(crops, torch.arange(n, device=self.device), n)
            rows, ready = _to_host(torch.cat([torch.ones_like(values[:, :1]), boxes,
                                              values[:, 4:5], torch.zeros_like(owners)[:, None],
                                              *blocks], dim=1))
        return Launched(rows, counts, ready, self.pipeline.detector, layout, given)

    def detect(
        self, images: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Per image: boxes in its own pixels, scores and labels above the threshold. Boolean
        indexing syncs once per image: for callers that want tensors (precision checks); the
        engine's path is launch()."""
        found = self._detect(images)
        boxes, scores, labels = [], [], []
        for start, stop in found.spans():
            keep = found.keep[start:stop]
            boxes.append(found.boxes[start:stop][keep])
            scores.append(found.scores[start:stop][keep])
            labels.append(found.labels[start:stop][keep])
        return boxes, scores, labels

    def _detect(self, images: list[torch.Tensor]) -> _Found:
        """Resizes on the device (antialiased; in uint8 on a CPU, 15x faster there than in float)
        so 4K frames never reach the model's own transform at full size, then maps every box
        back to its image's pixels: the per-image factors and limits travel to the device in
        one copy and are spread over the boxes there. The threshold is a mask, not a filter."""
        entry = self.pipeline.detector.entry
        inputs, table = [], []
        for img in images:
            h, w = img.shape[-2:]
            lo, hi = entry.input_size
            scale = min(lo / min(h, w), hi / max(h, w))
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            x = img.unsqueeze(0)
            if img.device.type != "cpu":  # CUDA interpolates floats only
                x = x.float()
            if (nh, nw) != (h, w):
                x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True)
            inputs.append(x[0].float().div_(255.0))
            table.append([w / nw, h / nh, w / nw, h / nh, w, h, w, h])
        with torch.autocast(self.device.type, enabled=False):  # heads, decoding, NMS: fp32
            outputs = self.detector(inputs)
        if isinstance(outputs, tuple):  # scripted torchvision detectors return (losses, detections)
            outputs = outputs[1]
        counts = [int(out["boxes"].shape[0]) for out in outputs]  # shapes: known on the host
        for i, (row, count) in enumerate(zip(table, counts, strict=True)):
            row += [count, i]
        per_image = _to_device(torch.tensor(table, dtype=torch.float32), self.device)
        per_box = per_image.repeat_interleave(
            per_image[:, 8].long(), dim=0, output_size=sum(counts)
        )
        boxes = torch.cat([out["boxes"] for out in outputs]).float() * per_box[:, :4]
        boxes = torch.minimum(boxes.clamp(min=0), per_box[:, 4:8])
        scores = torch.cat([out["scores"] for out in outputs]).float()
        labels = torch.cat([out["labels"] for out in outputs])
        keep = scores >= self.pipeline.box_threshold
        return _Found(boxes, scores, labels, keep, counts, per_box[:, 9])

    def classify(self, crops: torch.Tensor) -> list[list[Classification]]:
        """Each crop's classifications, read back at once (a sync): for callers that need
        them now; the engine's path is launch()."""
        n = crops.shape[0]
        if n == 0:
            return []
        with torch.inference_mode():
            rows = torch.arange(n, device=crops.device)
            blocks, layout = self._route(crops, rows, n)
            host = torch.cat(blocks, dim=1).cpu().numpy()
        return layout.classifications(host, 0)

    def _route(
        self, crops: torch.Tensor, rows: torch.Tensor, n: int
    ) -> tuple[list[torch.Tensor], _Layout]:
        """Classifier outputs scattered into n result rows (crop i belongs to row rows[i]).
        Crops the filter calls negative skip the second classifier: one nonzero picks the
        others, made even when there is nothing to pick, so a batch's syncs stay constant."""
        rollup = self._rollup
        blocks: list[torch.Tensor] = []
        layout = _Layout()
        everything, every_row, pick = crops, rows, None
        if self.filter is not None and self.pipeline.filter is not None:
            model = self.pipeline.filter
            top = self._top_k(self.filter, model, crops)
            names = self.names(model, top[2]) if top else []
            blocks.append(layout.add(model.entry.name, names, top, rows, n))
            if top is None:
                positive = torch.zeros(0, dtype=torch.bool, device=crops.device)
            else:
                negative = self._negative(model, top[2])
                positive = negative.index_select(0, top[1][:, 0]).logical_not()
            pick = positive.nonzero().flatten()
            crops, rows = crops.index_select(0, pick), rows.index_select(0, pick)
        model = self.pipeline.classifier
        logits = None
        if self._features is None:
            if crops.shape[0]:
                logits = self._logits(self.classifier, model, crops)
        elif everything.shape[0]:
            # One forward over every crop: its features are every detection's embedding,
            # while only the filter's positives keep the classifier's labels.
            with self._features.catching():
                logits = self._logits(self.classifier, model, everything)
            logits = logits if pick is None else logits.index_select(0, pick)
        top = answer = raw = None
        if logits is not None and logits.shape[0]:  # a shape: known on the host
            probs = (rollup.mask(logits) if rollup else logits).softmax(dim=1)
            top = self._top_of(probs, rollup.kept if rollup else None)
            answer = rollup.answer(probs) if rollup else None
            if self.options.probabilities and logits.shape[1] <= MAX_STORED_LABELS:
                raw = logits.softmax(dim=1) if rollup and rollup.masked else probs
        names = self.names(model, top[2]) if top else []
        blocks.append(layout.add(model.entry.name, names, top, rows, n, rollup, answer))
        if raw is not None:
            blocks.append(layout.add_probabilities(raw, rows, n))
        if self._features is not None:
            blocks.append(layout.add_embeddings(self._features.take(), every_row, n))
        return blocks, layout

    def _top_k(
        self, module: nn.Module, model: LoadedModel, crops: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """Top-k probabilities and class indices, and the class count; None for no crops (the
        model never sees an empty batch)."""
        if crops.shape[0] == 0:
            return None
        return self._top_of(self._logits(module, model, crops).softmax(dim=1))

    def _top_of(
        self, probs: torch.Tensor, kept: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """`kept`: the labels a taxa list keeps; the top-k never reaches a removed one."""
        if probs.shape[0] == 0:
            return None
        k = min(self.pipeline.top_k, probs.shape[1], kept or probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        return values, indices, probs.shape[1]

    def _species_labels(self) -> list[str]:
        classifier = self.pipeline.classifier
        count = classifier.num_classes or len(classifier.labels)
        return [classifier.label(i) for i in range(count)]

    def _logits(self, module: nn.Module, model: LoadedModel, crops: torch.Tensor) -> torch.Tensor:
        out = []
        step = self.options.crop_batch_size
        mean, std = self._normalization(model)
        size = tuple(model.source.input_size)
        for start in range(0, crops.shape[0], step):
            x = crops[start : start + step]
            if tuple(x.shape[-2:]) != size:  # crops are cut at the classifier's size; a filter
                x = F.interpolate(  # trained at another takes them resized to its own
                    x, size=size, mode="bilinear", antialias=True, align_corners=False
                )
            x = normalize(x, mean, std)
            with self._autocast():
                out.append(module(x).float())
        return torch.cat(out)

    def _normalization(self, model: LoadedModel) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The model's mean and std on the device, copied there once, not per batch."""
        name = model.entry.name
        if name not in self._norms:
            entry = model.entry
            self._norms[name] = (
                None if entry.mean is None else torch.tensor(entry.mean, device=self.device),
                None if entry.std is None else torch.tensor(entry.std, device=self.device),
            )
        return self._norms[name]

    def names(self, model: LoadedModel, classes: int) -> list[str]:
        """The model's label of each class index, looked up once."""
        key = (model.entry.name, classes)
        if key not in self._names:
            self._names[key] = [model.label(i) for i in range(classes)]
        return self._names[key]

    def _negative(self, model: LoadedModel, classes: int) -> torch.Tensor:
        """Per class index of the filter: is it the negative label? On the device, made once."""
        key = (model.entry.name, classes)
        if key not in self._negatives:
            negative = self.pipeline.filter_negative_label
            flags = [name == negative for name in self.names(model, classes)]
            self._negatives[key] = torch.tensor(flags, device=self.device)
        return self._negatives[key]

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


class _Features:
    """Catches the input of a classifier's last linear layer (the registry's embedding_layer)
    as the classifier runs: the pooled penultimate features, with no second forward."""

    def __init__(self, layer: nn.Linear) -> None:
        self.dim = layer.in_features
        self._caught: list[torch.Tensor] = []
        self._armed = False  # the module may be shared (another BatchForward on one pipeline)
        layer.register_forward_pre_hook(self._catch)

    @classmethod
    def attach(cls, model: LoadedModel) -> _Features | None:
        """None for a classifier whose registry entry names no linear embedding layer, and for
        TorchScript files (no hooks): its detections get no embedding, and tracking links
        them by geometry alone."""
        name = model.entry.embedding_layer
        if name is None or isinstance(model.module, torch.jit.ScriptModule):
            return None
        layer = model.module.get_submodule(name)
        return cls(layer) if isinstance(layer, nn.Linear) else None

    @contextlib.contextmanager
    def catching(self) -> Iterator[None]:
        """Catches only the calls made inside: this forward's, never another's."""
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def _catch(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if self._armed:
            self._caught.append(args[0].flatten(1))

    def take(self) -> torch.Tensor:
        """The features caught since the last take, in crop order, as float32."""
        caught, self._caught = self._caught, []
        if not caught:
            return torch.zeros((0, self.dim))
        return torch.cat(caught).float()


@dataclass
class _Found:
    """Every box the detector returned for a batch, concatenated, in original pixels."""

    boxes: torch.Tensor  # (N, 4) float
    scores: torch.Tensor  # (N,) float
    labels: torch.Tensor  # (N,) int
    keep: torch.Tensor  # (N,) bool: at or above the box threshold
    counts: list[int]  # boxes per image, in order
    owners: torch.Tensor  # (N,) float: the index of each box's image in the batch

    def spans(self) -> list[tuple[int, int]]:
        ends = list(itertools.accumulate(self.counts))
        return list(zip([0, *ends[:-1]], ends, strict=True))


@dataclass(frozen=True)
class _Block:
    classifier: str
    names: list[str]  # label of each class index
    k: int  # top-k columns; 0 where the classifier ran on no crop of the batch
    rollup: Rollup | None = None  # then 3 more columns: answer taxon, its score, its source


@dataclass
class _Layout:
    """Where each classifier's outputs sit in a result row: per classifier, a flag (it ran on
    this row's crop), k probabilities, k class indices, then with a taxa list or taxonomy the
    answer (Rollup.answer's three columns)."""

    blocks: list[_Block] = field(default_factory=list)
    embedding_dim: int = 0  # the embedding's columns, last in a row
    probabilities_dim: int = 0  # the species softmax's columns, after the classifiers'

    def add_probabilities(self, probs: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
        """(n, labels) columns: each classified crop's full softmax in its row."""
        self.probabilities_dim = probs.shape[1]
        out = torch.zeros((n, probs.shape[1]), device=rows.device)
        return out.index_copy_(0, rows, probs)

    def add_embeddings(self, features: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
        """(n, d) columns: each crop's features in its row."""
        self.embedding_dim = features.shape[1]
        out = torch.zeros((n, features.shape[1]), device=rows.device)
        return out.index_copy_(0, rows, features.to(rows.device))

    def add(
        self,
        classifier: str,
        names: list[str],
        top: tuple[torch.Tensor, torch.Tensor, int] | None,
        rows: torch.Tensor,
        n: int,
        rollup: Rollup | None = None,
        answer: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The classifier's (n, 1 + 2k [+ 3]) columns, its results scattered to their rows."""
        if top is None:
            self.blocks.append(_Block(classifier, names, 0))
            return torch.zeros((n, 1), device=rows.device)
        values, indices, _ = top
        k = values.shape[1]
        columns = [torch.ones_like(values[:, :1]), values, indices.float()]
        if answer is None:
            rollup = None
        else:
            columns.append(answer)
        self.blocks.append(_Block(classifier, names, k, rollup))
        src = torch.cat(columns, dim=1)
        return torch.zeros((n, src.shape[1]), device=rows.device).index_copy_(0, rows, src)

    def classifications(self, rows: np.ndarray, col: int) -> list[list[Classification]]:
        """Each result row's classifications, the classifier columns starting at `col`. A
        classifier's labels and scores are picked out for all its rows at once (numpy), so
        the Python left per row is making the objects."""
        out: list[list[Classification]] = [[] for _ in range(rows.shape[0])]
        for block in self.blocks:
            k = block.k
            if k:
                ran = rows[:, col].nonzero()[0]
                values = rows[ran, col + 1 : col + 1 + k].tolist()
                indices = rows[ran, col + 1 + k : col + 1 + 2 * k].astype(np.int64)
                labels = np.asarray(block.names, dtype=object)[indices].tolist()
                name = block.classifier
                rollup = block.rollup
                answers = (
                    rows[ran, col + 1 + 2 * k : col + 4 + 2 * k].tolist() if rollup else None
                )
                for j, (r, vs, ls) in enumerate(zip(ran.tolist(), values, labels, strict=True)):
                    topk = list(zip(ls, vs, strict=True))
                    if rollup is None or answers is None:
                        out[r].append(Classification(name, ls[0], vs[0], topk))
                        continue
                    node, score, source = answers[j]
                    out[r].append(Classification(
                        name, rollup.names[int(node)], score, topk,
                        rank=rollup.ranks[int(node)], source=SOURCES[int(source)],
                    ))
            col += 1 + 2 * k + (3 if block.rollup else 0)
        if self.probabilities_dim:  # the species classifier's, whose block is the last
            probs = rows[:, col : col + self.probabilities_dim].astype(np.float16)
            for r, found in enumerate(out):
                if found and found[-1].classifier == self.blocks[-1].classifier:
                    found[-1].probabilities = probs[r].tobytes()
        return out


class Launched:
    """A batch whose work is queued on the device and whose results land in host memory: one
    row per detector box (kept flag, box, score, label, then the classifiers' columns).

    detections() waits for the copy and builds the Detection objects, on whichever thread
    calls it: the engine calls it off its device thread, so a batch's Python work never
    delays the next batch's launch.
    """

    def __init__(
        self,
        rows: torch.Tensor,
        counts: list[int],
        ready: torch.cuda.Event | None,
        detector: LoadedModel,
        layout: _Layout,
        given: list[Sequence[Detection]] | None = None,
    ) -> None:
        self._rows = rows
        self._given = given  # re-classification: the boxes the rows were cut from
        self._counts = counts
        self._ready = ready
        self._detector = detector
        self._layout = layout
        self._built: list[list[Detection]] | None = None

    def per_image(self) -> list[LaunchedImage]:
        return [LaunchedImage(self, i) for i in range(len(self._counts))]

    def detections(self) -> list[list[Detection]]:
        """Per image, its detections above the threshold; built once, on the first call."""
        if self._built is None:
            if self._ready is not None:
                self._ready.synchronize()
            self._built = self._build()
        return self._built

    def _build(self) -> list[list[Detection]]:
        rows = self._rows.numpy()  # converted for the whole batch, never a value at a time
        head = rows[:, :7].tolist()
        classes = self._layout.classifications(rows, 7)
        d = self._layout.embedding_dim
        embeddings = rows[:, rows.shape[1] - d :].astype(np.float16) if d else None
        labels: dict[int, str] = {}
        out: list[list[Detection]] = []
        start = 0
        for count in self._counts:
            items = []
            stop = start + count
            for i, row, found in zip(range(start, stop), head[start:stop], classes[start:stop],
                                     strict=True):
                if not row[0]:
                    continue
                index = int(row[6])
                if index not in labels:
                    labels[index] = self._detector.label(index)
                x1, y1, x2, y2 = row[1:5]
                embedding = None if embeddings is None else embeddings[i].tobytes()
                if self._given is not None:  # the given box as it was, not float32-rounded
                    d = self._given[len(out)][i - start]
                    items.append(Detection(d.x1, d.y1, d.x2, d.y2, d.score, d.label, found,
                                           source=d.source, embedding=embedding))
                    continue
                items.append(Detection(x1, y1, x2, y2, row[5], labels[index], found,
                                       embedding=embedding))
            out.append(items)
            start += count
        return out


@dataclass(frozen=True)
class LaunchedImage:
    """One image's share of a launched batch."""

    batch: Launched
    index: int

    def detections(self) -> list[Detection]:
        return self.batch.detections()[self.index]


def _to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor to the device without waiting for the device (pinned on CUDA)."""
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def _to_host(rows: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A batch's results to the host in one copy; on CUDA a non-blocking one into pinned
    memory, with an event to wait on before reading it."""
    if rows.device.type == "cpu":
        return rows, None
    if rows.device.type != "cuda":
        return rows.cpu(), None
    host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
    host.copy_(rows, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(rows.device))
    return host, ready
