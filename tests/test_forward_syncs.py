"""The device thread launches and never waits: a batch's forward makes the same number of host
syncs whatever its number of images and boxes, its routing still gives every crop the result it
gets alone, and the Detection objects are built on another thread.

Syncs are counted with a TorchDispatchMode around trapq's own code (BatchForward.launch with the
registry's constant_boxes detector, whose forward is pure tensor ops): the aten ops that make a
CUDA host wait for the device (a scalar read, nonzero, boolean-mask indexing, a copy to the
host). On a CPU the same ops run, so the count is the one a GPU would pay.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from inference.engine import Engine, EngineConfig
from inference.forward import BatchForward, ForwardOptions, Launched
from inference.pipeline_spec import ModelSource
from inference.registry import ConstantBoxes, LoadedModel, ModelEntry, Pipeline
from inference.taxonomy import AnswerPolicy, Taxon, Taxonomy
from inference.types import WorkItem
from tests.inference_fixtures import encode

torch.set_num_threads(1)
CPU = torch.device("cpu")

# ops whose CUDA kernels read a device value back on the host
ALWAYS_SYNC = {
    "_local_scalar_dense",
    "nonzero",
    "is_nonzero",
    "equal",
    "masked_select",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "bincount",
}


def _is_sync(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    name = func.overloadpacket.__name__
    if name in ALWAYS_SYNC:
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()
        )
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None and len(args) < 3
    if name == "_to_copy":
        source, target = args[0].device, kwargs.get("device") or args[0].device
        crosses = torch.device(target) != source
        return crosses and (torch.device(target).type == "cpu" or not kwargs.get("non_blocking"))
    if name == "copy_":
        target, source = args[0].device, args[1].device
        return target != source and (target.type == "cpu" and not args[0].is_pinned())
    return False


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self.syncs.append(str(func))
        return func(*args, **kwargs)


class TinyNet(nn.Module):
    def __init__(self, classes: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


class Brightness(nn.Module):
    """A filter that calls bright crops moths and dark ones not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = x.mean(dim=(1, 2, 3))
        return torch.stack([bright, -bright], dim=1)


def _classifier(name: str, labels: list[str], module: nn.Module) -> LoadedModel:
    spec = ModelEntry(name, "classifier", "test", (8, 8), len(labels), None)
    return LoadedModel(module.eval(), spec, _source(name, labels), len(labels))


def _source(name: str, labels: list[str]) -> ModelSource:
    return ModelSource(name, "", tuple(labels), (8, 8), None)


def _pipeline(
    boxes: int, with_filter: bool, threshold: float = 0.75, device: torch.device = CPU
) -> Pipeline:
    spec = ModelEntry("constant_boxes", "detector", "constant_boxes", (48, 64), 2, None,
                     mean=None, std=None)
    detector = LoadedModel(
        ConstantBoxes(boxes=boxes).eval(), spec, _source("constant_boxes", ["bg", "insect"]), 2
    )
    flt = _classifier("filter", ["moth", "nonmoth"], Brightness()) if with_filter else None
    species = _classifier("species", list("abcdefg"), TinyNet(7, seed=2))
    for model in (detector, species, flt):
        if model is not None:
            model.module.to(device)
    pipe = Pipeline(device, detector, species, flt, threshold)
    pipe.top_k, pipe.filter_negative_label = 3, "nonmoth"
    return pipe


def _images(n: int, same_size: bool = False, device: torch.device = CPU) -> list[torch.Tensor]:
    """Noise over a left-to-right ramp: the filter keeps the right side's crops. Frames of one
    size are cropped a batch at once, frames of several sizes one by one."""
    generator = torch.Generator().manual_seed(n)
    images = []
    for i in range(n):
        ramp = torch.linspace(0, 200, 64).expand(3, 48 if same_size else 48 + 8 * i, 64)
        noise = torch.randint(0, 56, ramp.shape, generator=generator)
        images.append((ramp + noise).to(torch.uint8).to(device))
    return images


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


# A taxa list keeping five of the seven labels, and a genus and family to roll up to: masking,
# roll-up and the stored softmax add tensor ops only, never a sync.
ANSWERS = AnswerPolicy(
    Taxonomy(tuple(
        [Taxon(label, "species", label.upper(), "G1" if label < "d" else "G2", None)
         for label in "abcdefg"]
        + [Taxon("G1", "genus", "G1", "F", None), Taxon("G2", "genus", "G2", "F", None),
           Taxon("F", "family", "F", None, None)]
    )),
    ("a", "b", "c", "e", "g"),
    0.6,
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("same_size", [False, True])
@pytest.mark.parametrize("with_filter, expected", [(False, 1), (True, 2)])
@pytest.mark.parametrize("answers", [False, True])
def test_a_batch_costs_the_same_syncs_whatever_its_images_and_boxes(
    with_filter: bool, expected: int, same_size: bool, device: str, answers: bool
) -> None:
    dev = torch.device(device)
    counts: dict[tuple[int, int], int] = {}
    for boxes in (0, 20, 200):
        pipe = _pipeline(boxes, with_filter, device=dev)
        pipe.answers = ANSWERS if answers else None
        options = ForwardOptions(crop_batch_size=64, probabilities=answers)
        forward = BatchForward(pipe, options)
        forward(_images(2, same_size, dev))  # first use copies the models' constants, once
        for n in (1, 4, 8):
            images = _images(n, same_size, dev)
            with SyncCounter() as counter:
                launched = forward.launch(images)
            counts[(n, boxes)] = len(counter.syncs)
            detections = launched.detections()
            kept = int((torch.linspace(1.0, 0.5, boxes) >= 0.75).sum())
            assert [len(d) for d in detections] == [kept] * n
            assert all(len(d.classifications) >= 1 for ds in detections for d in ds)
            if answers:
                species = [d.classifications[-1] for ds in detections for d in ds
                           if d.classifications[-1].classifier == "species"]
                assert all(c.source.startswith("masked") and c.probabilities for c in species)
    assert set(counts.values()) == {expected}, counts


def test_batched_routing_gives_each_crop_its_results_alone() -> None:
    """A batch mixes crops the filter keeps and drops; each image's boxes, scores and
    classifications are the ones it gets in a batch of its own."""
    forward = BatchForward(_pipeline(20, with_filter=True), ForwardOptions(crop_batch_size=16))
    images = _images(4)
    batched = forward(images)
    classifiers = [len(d.classifications) for ds in batched for d in ds]
    assert 1 in classifiers and 2 in classifiers  # both routes taken in this batch
    for image, together in zip(images, batched, strict=True):
        alone = forward([image])[0]
        assert len(alone) == len(together)
        for a, b in zip(alone, together, strict=True):
            assert (a.x1, a.y1, a.x2, a.y2, a.label) == (b.x1, b.y1, b.x2, b.y2, b.label)
            assert abs(a.score - b.score) < 1e-6
            assert [(c.classifier, c.label) for c in a.classifications] == [
                (c.classifier, c.label) for c in b.classifications
            ]
            for ca, cb in zip(a.classifications, b.classifications, strict=True):
                assert [t[0] for t in ca.topk] == [t[0] for t in cb.topk]
                assert max(abs(x[1] - y[1]) for x, y in zip(ca.topk, cb.topk, strict=True)) < 1e-5


def test_detections_are_built_off_the_device_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real Launched.detections runs; the spy only notes which thread called it."""
    threads: list[str] = []
    build = Launched.detections

    def spy(self: Launched) -> Any:
        threads.append(threading.current_thread().name)
        return build(self)

    monkeypatch.setattr(Launched, "detections", spy)
    uri = tmp_path / "a.png"
    uri.write_bytes(encode(Image.new("RGB", (64, 48), (90, 120, 30)), "PNG"))
    config = EngineConfig(batch_size=4, decode_threads=1)
    with Engine(_pipeline(20, with_filter=False), config) as engine:
        results = list(engine.run(WorkItem(i, str(uri)) for i in range(6)))
    kept = int((torch.linspace(1.0, 0.5, 20) >= 0.75).sum())
    assert len(results) == 6 and all(r.ok and len(r.detections) == kept for r in results)
    assert threads and set(threads) == {"trapq-assemble_0"}
