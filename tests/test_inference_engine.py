"""The engine's numbers are the model's numbers, batching or not; bad items fail alone; memory is
bounded; callers never block each other."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from inference.crops import crop_and_resize
from inference.decode import decode, read_header
from inference.engine import Engine, EngineConfig
from inference.fetch import FetchPolicy
from inference.forward import BatchForward, ForwardOptions
from inference.pipeline_spec import ModelSource
from inference.registry import (
    ConstantBoxes,
    LoadedModel,
    ModelEntry,
    Pipeline,
    load_pipeline,
    model_source,
)
from inference.types import Detection, ErrorKind, ItemResult, WorkItem
from tests.inference_fixtures import HttpServer, chw, encode, http_server, structured_image

torch.set_num_threads(1)
CPU = torch.device("cpu")


class TinyNet(nn.Module):
    """A classifier cheap enough to run on every crop of every test."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


class FixedLogits(nn.Module):
    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


class BrightBox(nn.Module):
    """Finds the box of the bright pixels of the image it is given, in that image's pixels."""

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for image in images:
            ys, xs = (image.mean(0) > 0.5).nonzero(as_tuple=True)
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]).float()
            out.append({"boxes": box, "scores": torch.ones(1), "labels": torch.ones(1).long()})
        return out


class OutOfMemoryAbove1(ConstantBoxes):
    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        if len(images) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().forward(images)


class FailsOnWhite(ConstantBoxes):
    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        if any(image.mean() > 0.95 for image in images):
            raise RuntimeError("the model cannot take a white frame")
        return super().forward(images)


class Slow(ConstantBoxes):
    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        time.sleep(0.05)
        return super().forward(images)


def detector(module: nn.Module, size: tuple[int, int] = (64, 96)) -> LoadedModel:
    spec = ModelEntry("test_detector", "detector", "test", size, 2, None, mean=None, std=None)
    source = ModelSource(spec.name, "", ("background", "insect"), size, None)
    return LoadedModel(module.eval(), spec, source, 2)


def classifier(
    module: nn.Module | None = None, labels: list[str] | None = None, name: str = "tiny"
) -> LoadedModel:
    labels = labels or ["a", "b", "c"]
    spec = ModelEntry(name, "classifier", "test", (16, 16), len(labels), None)
    source = ModelSource(name, "", tuple(labels), (16, 16), None)
    return LoadedModel((module or TinyNet(len(labels))).eval(), spec, source, len(labels))


def pipeline(det: LoadedModel, flt: LoadedModel | None = None) -> Pipeline:
    return Pipeline(CPU, det, classifier(), flt, box_threshold=0.0)


def engine_for(pipe: Pipeline, **config: object) -> Engine:
    defaults: dict[str, object] = {
        "fetch": FetchPolicy(pool_size=2),
        "decode_threads": 1,
        "batch_wait_ms": 5,
    }
    return Engine(pipe, EngineConfig(**{**defaults, **config}))  # type: ignore[arg-type]


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def by_key(results: list[ItemResult]) -> dict[int, ItemResult]:
    return {r.key: r for r in results}


# numerics


def matches(single: list[Detection], batched: list[Detection]) -> None:
    assert len(single) == len(batched)
    for a, b in zip(
        sorted(single, key=lambda d: -d.score), sorted(batched, key=lambda d: -d.score), strict=True
    ):
        box_a, box_b = (a.x1, a.y1, a.x2, a.y2), (b.x1, b.y1, b.x2, b.y2)
        assert max(abs(p - q) for p, q in zip(box_a, box_b, strict=True)) < 1e-3
        assert a.label == b.label and abs(a.score - b.score) < 1e-4
        assert [c.label for c in a.classifications] == [c.label for c in b.classifications]
        for ca, cb in zip(a.classifications, b.classifications, strict=True):
            assert abs(ca.score - cb.score) < 1e-4


@pytest.fixture(scope="module")
def real_pipeline() -> Pipeline:
    """A real torchvision detector and classifier, random but seeded; the class scores are
    spread so that near-ties cannot reorder detections between runs."""
    torch.manual_seed(0)
    pipe = load_pipeline(
        model_source("fasterrcnn_mobilenet_v3_large_320_fpn", "detector", random_weights=True),
        model_source("mobilenet_v3_large", "classifier", random_weights=True),
        device="cpu",
        box_threshold=0.0,
        detector_kwargs={"box_detections_per_img": 6},
    )
    with torch.no_grad():
        pipe.detector.module.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.5)
    return pipe


@pytest.mark.heavy
def test_batched_equals_one_at_a_time(real_pipeline: Pipeline) -> None:
    """Three sizes that the detector's resize brings to one shape, so padding is identical."""
    images = [
        chw(structured_image(w, h, seed=i))
        for i, (w, h) in enumerate([(320, 240), (640, 480), (160, 120)])
    ]
    forward = BatchForward(real_pipeline, ForwardOptions(crop_batch_size=5))
    batched = forward(images)
    for image, together in zip(images, batched, strict=True):
        alone = forward([image])[0]
        assert len(alone) == 6
        matches(alone, together)
        h, w = image.shape[-2:]
        assert all(0 <= d.x1 <= d.x2 <= w and 0 <= d.y1 <= d.y2 <= h for d in alone)


@pytest.mark.heavy
def test_engine_batches_give_the_same_results_as_single_forwards(
    tmp_path: Path, real_pipeline: Pipeline
) -> None:
    uris = [
        write(tmp_path / f"{i}.png", encode(structured_image(w, h, seed=10 + i), "PNG"))
        for i, (w, h) in enumerate([(320, 240), (640, 480), (160, 120), (320, 240)])
    ]
    forward = BatchForward(real_pipeline, ForwardOptions())
    with engine_for(real_pipeline, batch_size=4, batch_wait_ms=500) as engine:
        results = by_key(list(engine.run(WorkItem(i, u) for i, u in enumerate(uris))))
        stats = engine.stats()
    assert stats.images == 4 and stats.crops == 24
    for i, uri in enumerate(uris):
        data = Path(uri).read_bytes()
        alone = forward([decode(data, read_header(data, 10**8, uri), uri)])[0]
        matches(alone, results[i].detections)


def test_box_found_in_the_resized_input_comes_back_in_original_pixels(tmp_path: Path) -> None:
    image = Image.new("RGB", (1000, 600))
    image.paste((255, 255, 255), (300, 200, 500, 350))
    uri = write(tmp_path / "square.png", encode(image, "PNG"))
    pipe = pipeline(detector(BrightBox(), size=(120, 200)))  # 1000x600 runs at 200x120
    with engine_for(pipe) as engine:
        [result] = list(engine.run([WorkItem(1, uri)]))
    assert (result.width, result.height) == (1000, 600)
    [d] = result.detections
    for got, want in zip((d.x1, d.y1, d.x2, d.y2), (300, 200, 500, 350), strict=True):
        assert abs(got - want) <= 5  # one pixel of the 5x smaller input
    assert d.label == "insect" and d.classifications[0].classifier == "tiny"


def test_roi_align_crops_match_reference_crop_and_resize() -> None:
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    same = crop_and_resize(image, torch.tensor([[10.0, 5.0, 26.0, 21.0]]), (16, 16))[0]
    assert torch.allclose(same, image[:, 5:21, 10:26].float(), atol=1e-3)
    half = crop_and_resize(image, torch.tensor([[10.0, 5.0, 42.0, 37.0]]), (16, 16))[0]
    reference = F.avg_pool2d(image[:, 5:37, 10:42].float().unsqueeze(0), 2)[0]
    assert torch.allclose(half, reference, atol=1e-3)


def test_big_boxes_shrunk_before_alignment_match_area_averaged_crops() -> None:
    """On a CPU a box many times the output size is shrunk first; the crop stays the area
    average of the box that the whole-frame path computes, up to resampling."""
    image = chw(structured_image(640, 480, seed=4))
    boxes = torch.tensor([[10.0, 20.0, 610.0, 470.0], [100.5, 50.25, 400.0, 300.0]])
    whole = crop_and_resize(image, boxes, (32, 32), windowed=False)
    shrunk = crop_and_resize(image, boxes, (32, 32), windowed=True)
    assert (whole - shrunk).abs().mean() < 2.0  # of 255


def test_windowed_crops_equal_whole_frame_crops() -> None:
    """The CPU path converts only a window around each box; the values must not change."""
    torch.manual_seed(1)
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)
    boxes = torch.tensor(
        [[0.0, 0.0, 13.3, 9.7], [50.2, 41.9, 80.0, 60.0], [20.5, 10.25, 47.75, 33.1]]
    )
    whole = crop_and_resize(image, boxes, (12, 10), windowed=False)
    windows = crop_and_resize(image, boxes, (12, 10), windowed=True)
    assert torch.allclose(whole, windows, atol=1e-4)


# bad input


@pytest.fixture
def server() -> Iterator[HttpServer]:
    with http_server() as s:
        s.stall_s = 2.0
        s.files["good.jpg"] = encode(structured_image(64, 48, seed=3))
        yield s


def test_every_bad_input_gets_its_own_error_and_good_items_still_come_back(
    tmp_path: Path, server: HttpServer
) -> None:
    root = tmp_path / "captures"
    root.mkdir()
    good = encode(structured_image(64, 48, seed=1))
    bomb = bytearray(good)
    sof = bomb.index(b"\xff\xc0")
    bomb[sof + 5 : sof + 9] = (5000).to_bytes(2, "big") + (5000).to_bytes(2, "big")
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(good)
    cases = {
        write(root / "good.jpg", good): None,
        write(root / "good.png", encode(structured_image(40, 30, seed=2), "PNG")): None,
        f"{server.base}/file/good.jpg": None,
        write(root / "truncated.jpg", good[: len(good) // 2]): ErrorKind.UNDECODABLE,
        write(root / "empty.jpg", b""): ErrorKind.UNDECODABLE,
        write(root / "text.jpg", b"not a picture\n" * 10): ErrorKind.UNDECODABLE,
        str(root / "missing.jpg"): ErrorKind.MISSING,
        write(root / "bomb.jpg", bytes(bomb)): ErrorKind.TOO_MANY_PIXELS,
        write(root / "huge.jpg", good + b"\0" * 300_000): ErrorKind.TOO_LARGE,
        f"{server.base}/status/404": ErrorKind.HTTP_STATUS,
        f"{server.base}/status/500": ErrorKind.HTTP_SERVER,
        f"{server.base}/stall": ErrorKind.TIMEOUT,
        f"{server.base}/loop": ErrorKind.NETWORK,
        "ftp://example.org/a.jpg": ErrorKind.FORBIDDEN,
        str(outside): ErrorKind.FORBIDDEN,
    }
    pipe = pipeline(detector(ConstantBoxes(boxes=3)))
    fetch = FetchPolicy(
        allowed_roots=(root,),
        max_image_bytes=200_000,
        http_read_timeout_s=0.5,
        http_max_redirects=2,
        pool_size=2,
    )
    config = {"fetch": fetch, "max_image_pixels": 1_000_000, "batch_size": 4}
    uris = list(cases)
    with engine_for(pipe, **config) as engine:
        results = by_key(list(engine.run(WorkItem(i, u) for i, u in enumerate(uris))))
    assert len(results) == len(uris)
    for i, uri in enumerate(uris):
        result, expected = results[i], cases[uri]
        assert result.error_kind == expected, (uri, result.error)
        if expected is None:
            assert len(result.detections) == 3 and result.width and result.height
            assert all(d.classifications for d in result.detections)
        else:
            assert result.error and "\n" not in result.error and not result.detections


def test_a_batch_the_model_refuses_is_halved_until_each_part_runs(tmp_path: Path) -> None:
    """The splitting logic only (the exception class stands in for CUDA's); that the failed
    attempt's tensors are freed before the halves run is the weakref test below."""
    uris = [
        write(tmp_path / f"{i}.png", encode(structured_image(32, 24, i), "PNG")) for i in range(4)
    ]
    with engine_for(pipeline(detector(OutOfMemoryAbove1(boxes=2))), batch_size=4) as engine:
        results = list(engine.run(WorkItem(i, u) for i, u in enumerate(uris)))
    assert sorted(r.key for r in results) == [0, 1, 2, 3]
    assert all(r.ok and len(r.detections) == 2 for r in results)


def test_a_model_failure_on_one_image_fails_that_image_alone(tmp_path: Path) -> None:
    white = write(tmp_path / "white.png", encode(Image.new("RGB", (32, 24), "white"), "PNG"))
    uris = [
        write(tmp_path / f"{i}.png", encode(structured_image(32, 24, i), "PNG")) for i in range(3)
    ]
    with engine_for(pipeline(detector(FailsOnWhite(boxes=2))), batch_size=4) as engine:
        results = by_key(list(engine.run(WorkItem(i, u) for i, u in enumerate([white, *uris]))))
        again = list(engine.run([WorkItem(9, uris[0])]))  # the engine thread is still alive
    assert results[0].error_kind == ErrorKind.MODEL and "white frame" in (results[0].error or "")
    assert all(results[i].ok for i in (1, 2, 3)) and again[0].ok


# backpressure (issue 8)


@pytest.mark.parametrize("max_images, max_frames_of_bytes", [(3, 100), (16, 2)])
def test_decoded_images_held_never_exceed_the_bound(
    tmp_path: Path, max_images: int, max_frames_of_bytes: int
) -> None:
    """Fetch and decode outrun a slow model; the producers block at the bound."""
    frame_bytes = 64 * 48 * 3
    uri = write(tmp_path / "a.png", encode(structured_image(64, 48, seed=0), "PNG"))
    pipe = pipeline(detector(Slow(boxes=2)))
    config = {
        "batch_size": 2,
        "fetch": FetchPolicy(pool_size=4),
        "decode_threads": 2,
        "max_images_in_flight": max_images,
        "max_bytes_in_flight": max_frames_of_bytes * frame_bytes,
    }
    with engine_for(pipe, **config) as engine:
        results = list(engine.run(WorkItem(i, uri) for i in range(30)))
        stats = engine.stats()
    assert len(results) == 30 and all(r.ok for r in results)
    bound = min(max_images, max_frames_of_bytes)
    assert stats.decoded_in_flight_peak == bound  # reached: the producers were faster
    assert stats.images_in_flight_peak <= max_images
    assert stats.bytes_in_flight_peak <= max_frames_of_bytes * frame_bytes
    assert stats.images_in_flight == stats.decoded_in_flight == stats.bytes_in_flight == 0


# callers


def test_concurrent_callers_each_get_their_own_results(tmp_path: Path) -> None:
    uri = write(tmp_path / "a.jpg", encode(structured_image(48, 32, seed=0)))
    got: dict[int, list[int]] = {}

    def caller(n: int, engine: Engine) -> None:
        got[n] = sorted(r.key for r in engine.run(WorkItem(n * 100 + i, uri) for i in range(6)))

    with engine_for(pipeline(detector(ConstantBoxes(boxes=2))), batch_size=8) as engine:
        threads = [threading.Thread(target=caller, args=(n, engine)) for n in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = engine.stats()
    assert got == {n: [n * 100 + i for i in range(6)] for n in range(3)}
    assert stats.images == 18 and stats.crops == 36


def test_a_caller_that_stops_early_frees_its_share_and_blocks_nobody(tmp_path: Path) -> None:
    uri = write(tmp_path / "a.jpg", encode(structured_image(48, 32, seed=0)))
    pipe = pipeline(detector(Slow(boxes=1)))
    with engine_for(pipe, max_images_in_flight=4, batch_size=2) as engine:
        run = engine.run(WorkItem(i, uri) for i in range(1000))
        with pytest.raises(KeyError):
            for _ in run:
                raise KeyError("caller bug")
        other = list(engine.run(WorkItem(i, uri) for i in range(5)))
        assert len(other) == 5 and all(r.ok for r in other)
        for _ in range(200):
            if engine.stats().images_in_flight == 0:
                break
            time.sleep(0.05)
        stats = engine.stats()
    assert stats.images_in_flight == 0 and stats.bytes_in_flight == 0
    assert stats.images < 100  # the abandoned run stopped feeding


def test_a_failing_item_iterable_is_reported_after_its_results(tmp_path: Path) -> None:
    uri = write(tmp_path / "a.jpg", encode(structured_image(48, 32, seed=0)))

    def items() -> Iterator[WorkItem]:
        yield WorkItem(1, uri)
        yield WorkItem(2, uri)
        raise ValueError("the caller's query failed")

    seen = []
    with engine_for(pipeline(detector(ConstantBoxes(boxes=1)))) as engine:
        with pytest.raises(ValueError, match="query failed"):
            for result in engine.run(items()):
                seen.append(result.key)
    assert sorted(seen) == [1, 2]


# the filter stage and top-k


@pytest.mark.parametrize("filter_logits, expected", [([5.0, 0.0], 2), ([0.0, 5.0], 1)])
def test_crops_the_filter_calls_negative_skip_the_second_classifier(
    tmp_path: Path, filter_logits: list[float], expected: int
) -> None:
    uri = write(tmp_path / "a.jpg", encode(structured_image(48, 32, seed=0)))
    flt = classifier(FixedLogits(filter_logits), ["moth", "nonmoth"], name="filter")
    pipe = pipeline(detector(ConstantBoxes(boxes=3)), flt)
    pipe.top_k, pipe.filter_negative_label = 2, "nonmoth"
    with engine_for(pipe) as engine:
        [result] = list(engine.run([WorkItem(1, uri)]))
    for d in result.detections:
        assert len(d.classifications) == expected
        assert d.classifications[0].classifier == "filter"
        assert len(d.classifications[-1].topk) == 2


def test_an_unforeseen_fetch_error_is_a_fetch_bug_not_a_transient_network_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Retrying a chunk cannot fix a bug: such an item fails alone, and no retry is spent."""

    def broken(uri: str) -> bytes:
        raise KeyError(uri)

    with engine_for(pipeline(detector(ConstantBoxes(boxes=1)))) as engine:
        monkeypatch.setattr(engine._fetcher, "fetch", broken)
        [result] = list(engine.run([WorkItem(1, "/captures/a.jpg")]))
    assert result.error_kind == ErrorKind.FETCH_BUG and not result.transient
    assert "KeyError" in (result.error or "") and "/captures/a.jpg" in (result.error or "")


def test_a_fault_outside_the_model_fails_its_batch_and_the_engine_serves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = write(tmp_path / "a.jpg", encode(structured_image(48, 32, seed=0)))
    with engine_for(pipeline(detector(ConstantBoxes(boxes=1)))) as engine:
        with monkeypatch.context() as patch:
            patch.setattr(engine, "_to_device", lambda batch: 1 / 0)
            [failed] = list(engine.run([WorkItem(1, uri)]))
        [ok] = list(engine.run([WorkItem(2, uri)]))
        stats = engine.stats()
    assert failed.error_kind == ErrorKind.MODEL and "ZeroDivisionError" in (failed.error or "")
    assert ok.ok and stats.images_in_flight == 0


def test_bf16_runs_the_classifier_in_bfloat16_and_hands_back_float_scores(
    tmp_path: Path,
) -> None:
    uri = write(tmp_path / "a.jpg", encode(structured_image(48, 32, seed=0)))
    pipe = pipeline(detector(ConstantBoxes(boxes=2)))
    logits: list[torch.dtype] = []
    hook = pipe.classifier.module.register_forward_hook(lambda _m, _i, o: logits.append(o.dtype))
    pipe.precision = "bf16"
    with engine_for(pipe) as engine:
        [result] = list(engine.run([WorkItem(1, uri)]))
    hook.remove()
    assert logits == [torch.bfloat16]
    scores = [c.score for d in result.detections for c in d.classifications]
    assert len(scores) == 2 and all(0.0 < s <= 1.0 for s in scores)
