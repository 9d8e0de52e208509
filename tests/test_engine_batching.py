"""The engine's speed claims: items waiting behind a busy device leave in one full batch, and a
batch takes items of every run (chunk) waiting, so chunk boundaries never shrink batches.

Event-driven: a detector holds its first batch until the test releases it, once the items meant
to form the next batch are decoded and waiting (the engine's in-flight count says so).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch
from PIL import Image

from inference.engine import Engine, EngineConfig
from inference.forward import ForwardOptions
from inference.pipeline_spec import ModelSource
from inference.registry import ConstantBoxes, LoadedModel, ModelEntry, Pipeline
from inference.types import ItemResult, WorkItem
from tests.inference_fixtures import encode

torch.set_num_threads(1)
WAIT_S = 60.0  # a bound for a loaded machine, never a measurement


class HeldFirstBatch(ConstantBoxes):
    """Holds its first batch until released; notes the mean grey level of each batch's images,
    which tells the runs apart."""

    def __init__(self) -> None:
        super().__init__(boxes=1)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.batches: list[list[int]] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.batches.append([round(float(image.mean()) * 255) for image in images])
        self.entered.set()
        assert self.release.wait(WAIT_S), "the test never released the first batch"
        return super().forward(images)


class Identity(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _source(name: str, labels: tuple[str, ...]) -> ModelSource:
    return ModelSource(name, "", labels, (8, 8), None)


def _pipeline(detector: HeldFirstBatch) -> Pipeline:
    det_spec = ModelEntry("held", "detector", "test", (24, 32), 2, None, mean=None, std=None)
    cls_spec = ModelEntry("grey", "classifier", "test", (8, 8), 3, None)
    return Pipeline(
        torch.device("cpu"),
        LoadedModel(detector.eval(), det_spec, _source("held", ("bg", "insect")), 2),
        LoadedModel(Identity(), cls_spec, _source("grey", ("r", "g", "b")), 3),
        box_threshold=0.0,
    )


def _engine(detector: HeldFirstBatch, batch_size: int) -> Engine:
    config = EngineConfig(
        batch_size=batch_size,
        batch_wait_ms=5,
        decode_threads=1,
        max_images_in_flight=2 * batch_size,
        forward=ForwardOptions(crop_batch_size=64),
    )
    return Engine(_pipeline(detector), config)


def _png(folder: Path, grey: int) -> str:
    path = folder / f"grey{grey}.png"
    path.write_bytes(encode(Image.new("RGB", (32, 24), (grey, grey, grey)), "PNG"))
    return str(path)


def _wait_until_waiting(engine: Engine, items: int) -> None:
    """Until `items` decoded frames are in flight (the held batch's and those queued)."""
    deadline = time.monotonic() + WAIT_S
    while engine.stats().decoded_in_flight < items:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.01)


def _read(engine: Engine, items: list[WorkItem], into: list[ItemResult]) -> threading.Thread:
    thread = threading.Thread(target=lambda: into.extend(engine.run(items)))
    thread.start()
    return thread


def test_items_waiting_behind_a_busy_device_leave_in_one_full_batch(tmp_path: Path) -> None:
    detector = HeldFirstBatch()
    uri = _png(tmp_path, 128)
    results: list[ItemResult] = []
    with _engine(detector, batch_size=4) as engine:
        reader = _read(engine, [WorkItem(i, uri) for i in range(9)], results)
        assert detector.entered.wait(WAIT_S)
        _wait_until_waiting(engine, len(detector.batches[0]) + 4)
        detector.release.set()
        reader.join(WAIT_S)
        stats = engine.stats()
    assert len(results) == 9 and all(r.ok for r in results)
    assert len(detector.batches[1]) == 4  # the four that waited, together
    assert stats.batches == len(detector.batches) and stats.mean_batch_size > 1


def test_one_batch_takes_the_items_of_every_run_waiting(tmp_path: Path) -> None:
    """Two chunks' runs queue behind a third's held batch; the next batch holds both."""
    detector = HeldFirstBatch()
    first, dark, bright = _png(tmp_path, 128), _png(tmp_path, 30), _png(tmp_path, 220)
    held: list[ItemResult] = []
    darks: list[ItemResult] = []
    brights: list[ItemResult] = []
    with _engine(detector, batch_size=4) as engine:
        readers = [_read(engine, [WorkItem(0, first)], held)]
        assert detector.entered.wait(WAIT_S)
        readers.append(_read(engine, [WorkItem(10 + i, dark) for i in range(2)], darks))
        readers.append(_read(engine, [WorkItem(20 + i, bright) for i in range(2)], brights))
        _wait_until_waiting(engine, 1 + 4)
        detector.release.set()
        for reader in readers:
            reader.join(WAIT_S)
    assert detector.batches[0] == [128]
    assert sorted(detector.batches[1]) == [30, 30, 220, 220]  # one batch, both runs
    assert sorted(r.key for r in darks) == [10, 11] and sorted(r.key for r in brights) == [20, 21]
    assert all(r.ok and len(r.detections) == 1 for r in held + darks + brights)
