"""The device thread under model and device faults, every branch a CPU can reach: an OOM split
frees the failed attempt before it retries; a sticky CUDA error fails its batch as retryable and
marks the engine faulted; torch.compile is warmed up at start, and its failure stops the start."""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from inference.device_fault import DeviceFault, is_device_fault
from inference.engine import Engine, EngineConfig, EngineStartError
from inference.fetch import FetchPolicy
from inference.forward import ForwardOptions
from inference.pipeline_spec import ModelSource
from inference.registry import (
    ConstantBoxes,
    LoadedModel,
    ModelEntry,
    Pipeline,
    Role,
    load_pipeline,
    model_source,
)
from inference.types import ErrorKind, WorkItem
from tests.inference_fixtures import encode, structured_image
from tests.local_http import QuietHandler, serving

torch.set_num_threads(1)
CPU = torch.device("cpu")


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _loaded(
    module: nn.Module, role: Role, size: tuple[int, int], labels: tuple[str, ...]
) -> LoadedModel:
    spec = ModelEntry(f"test_{role}", role, "test", size, len(labels), None, mean=None, std=None)
    source = ModelSource(spec.name, "", labels, size, None)
    return LoadedModel(module.eval(), spec, source, len(labels))


def pipeline_of(detector: nn.Module) -> Pipeline:
    det = _loaded(detector, "detector", (64, 96), ("background", "insect"))
    cls = _loaded(TinyNet(), "classifier", (16, 16), ("a", "b", "c"))
    return Pipeline(CPU, det, cls, None, box_threshold=0.0)


def engine_for(pipe: Pipeline, **config: object) -> Engine:
    defaults: dict[str, object] = {
        "fetch": FetchPolicy(pool_size=2),
        "decode_threads": 1,
        "batch_wait_ms": 2000,  # a batch closes early once full
    }
    return Engine(pipe, EngineConfig(**{**defaults, **config}))  # type: ignore[arg-type]


def jpegs(tmp_path: Path, n: int) -> list[WorkItem]:
    items = []
    for i in range(n):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(encode(structured_image(48, 32, seed=i)))
        items.append(WorkItem(i, str(path)))
    return items


# OOM splitting


class RemembersItsActivations(ConstantBoxes):
    """Runs out of memory on batches over one image, holding a large activation in its frame as
    a real forward does; on each later call it records whether any earlier attempt's activation
    is still alive."""

    def __init__(self) -> None:
        super().__init__(boxes=2)
        self.activations: list[weakref.ref[torch.Tensor]] = []
        self.alive_at_retry: list[int] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.alive_at_retry.append(sum(ref() is not None for ref in self.activations))
        activation = torch.empty(len(images), 256, 256)
        self.activations.append(weakref.ref(activation))
        if len(images) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().forward(images)


def test_an_oom_split_frees_the_failed_attempt_before_each_retry(tmp_path: Path) -> None:
    model = RemembersItsActivations()
    with engine_for(pipeline_of(model), batch_size=4) as engine:
        results = list(engine.run(jpegs(tmp_path, 4)))
        stats = engine.stats()
    assert stats.batches == 1  # one batch of 4, split 4 -> 2+2 -> 1+1+1+1
    assert sorted(r.key for r in results) == [0, 1, 2, 3]
    assert all(r.ok and len(r.detections) == 2 for r in results)
    assert len(model.alive_at_retry) == 7 and model.alive_at_retry == [0] * 7


# sticky CUDA errors


class IllegalAddress(ConstantBoxes):
    """Fails as CUDA does after an illegal memory access: every call from then on."""

    def __init__(self, error: Exception) -> None:
        super().__init__(boxes=2)
        self.error = error
        self.calls = 0

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.calls += 1
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("CUDA error: device-side assert triggered"),
        RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
    ],
    ids=["illegal_address", "device_assert", "cudnn"],
)
def test_a_sticky_cuda_error_raises_device_fault_to_the_caller_and_fails_no_item(
    tmp_path: Path, error: Exception
) -> None:
    model = IllegalAddress(error)
    with engine_for(pipeline_of(model), batch_size=4) as engine:
        seen = []
        with pytest.raises(DeviceFault, match="must restart"):
            for result in engine.run(jpegs(tmp_path, 4)):
                seen.append(result)
        with pytest.raises(DeviceFault, match="failed earlier"):
            engine.run(jpegs(tmp_path, 1))
        stats = engine.stats()
    assert seen == []  # no capture is failed for the device's fault
    assert model.calls == 1  # no split: every later CUDA call would fail as well
    assert engine.fault is not None and str(error) in engine.fault
    assert stats.images_in_flight == stats.bytes_in_flight == 0


def test_out_of_memory_is_not_a_device_fault(tmp_path: Path) -> None:
    model = IllegalAddress(torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)"))
    with engine_for(pipeline_of(model), batch_size=2) as engine:
        results = list(engine.run(jpegs(tmp_path, 2)))
    assert engine.fault is None
    assert all(r.error_kind == ErrorKind.MODEL and "out of memory" in (r.error or "")
               for r in results)


def test_a_cuda_error_raised_inside_a_torchscript_model_is_a_device_fault() -> None:
    """TorchScript wraps it in torch.jit.Error, which is not a RuntimeError."""

    class Faults(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool(x.sum() > 0):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return x

    scripted = torch.jit.script(Faults())
    with pytest.raises(torch.jit.Error) as caught:
        scripted(torch.ones(2))
    assert not isinstance(caught.value, RuntimeError)
    assert is_device_fault(caught.value)
    assert not is_device_fault(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


# torch.compile at start-up


def _demo_pipeline() -> Pipeline:
    """The demo FCOS detector (a torchvision backbone, compiled) with random weights."""
    torch.manual_seed(0)
    pipe = load_pipeline(
        model_source("demo_detector", "detector", random_weights=True),
        model_source("demo_classifier", "classifier", random_weights=True),
        device="cpu",
        box_threshold=0.0,
    )
    return pipe


@pytest.mark.heavy
def test_compile_captures_graphs_in_start_and_changes_no_result(tmp_path: Path) -> None:
    """TorchDynamo's graph capture through the `eager` backend, which generates no code:
    Inductor's own output is checked on a GPU (bench.gpu_check's compile check)."""
    items = jpegs(tmp_path, 2)
    calls: list[int] = []
    eager_pipe, compiled_pipe = _demo_pipeline(), _demo_pipeline()
    compiled_pipe.detector.module.register_forward_hook(lambda *_: calls.append(1))
    with engine_for(eager_pipe, batch_size=2) as engine:
        expected = {r.key: r for r in engine.run(items)}
    forward = ForwardOptions(crop_batch_size=8, compile=True, compile_backend="eager")
    engine = engine_for(compiled_pipe, batch_size=2, forward=forward)
    engine.start()
    try:
        # compiled on dummy batches of 1 and batch_size in start(), before any capture
        assert calls == [1, 1] and engine.warm_up_s > 0
        got = {r.key: r for r in engine.run(items)}
    finally:
        engine.close()
    assert len(calls) == 3
    for key, result in expected.items():
        assert result.ok and len(result.detections) == len(got[key].detections) > 0
        for a, b in zip(result.detections, got[key].detections, strict=True):
            assert abs(a.x1 - b.x1) < 1e-3 and abs(a.score - b.score) < 1e-4
            assert a.classifications[0].label == b.classifications[0].label


def test_a_compiler_that_fails_stops_the_start_with_one_line_saying_what_to_do() -> None:
    from torch._dynamo import register_backend

    @register_backend(name="trapq_test_no_c_compiler")  # type: ignore[misc]
    def no_c_compiler(*_: object, **__: object) -> object:
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable")

    forward = ForwardOptions(compile=True, compile_backend="trapq_test_no_c_compiler")
    engine = engine_for(pipeline_of(ConstantBoxes(boxes=2)), forward=forward)
    with pytest.raises(EngineStartError) as failed:
        engine.start()
    message = str(failed.value)
    assert "\n" not in message and "TRAPQ_COMPILE=false" in message
    assert "C compiler" in message
    with pytest.raises(RuntimeError, match="start"):
        engine.run([])  # nothing was started


# a separate bound for items still being fetched


def test_stalled_fetches_do_not_take_the_image_slots_of_fetched_captures(tmp_path: Path) -> None:
    """Two captures on a host that stalls until the fast ones are through: with two image slots,
    the stalled fetches held both and the GPU waited on them. Fetching now has a bound of its
    own, so the fast captures pass them."""
    release = threading.Event()

    class Stalls(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802
            release.wait(30)
            self.send_body(200, encode(structured_image(48, 32, seed=9)), "image/jpeg")

    fast = jpegs(tmp_path, 6)
    with serving(Stalls) as base:
        slow = [WorkItem(100 + i, f"{base}/slow{i}.jpg") for i in range(2)]
        engine = engine_for(
            pipeline_of(ConstantBoxes(boxes=1)), batch_size=1, max_images_in_flight=2,
            fetch=FetchPolicy(pool_size=4), batch_wait_ms=5,
        )
        order = []
        with engine:
            for result in engine.run([*slow, *fast]):
                order.append(result.key)
                if set(order) >= {item.key for item in fast}:
                    release.set()
            stats = engine.stats()
        release.set()
    assert set(order[:6]) == {item.key for item in fast}, order
    assert sorted(order[6:]) == [100, 101]
    assert stats.images_in_flight_peak <= 2 and stats.images_in_flight == 0


def test_a_fault_after_the_first_batch_fails_no_queued_item_and_frees_every_slot(
    tmp_path: Path,
) -> None:
    """Items queued behind the faulting batch never reach the device: their run is already
    interrupted, and each gives back its share of the bounds."""
    model = IllegalAddress(torch.AcceleratorError("CUDA error: unspecified launch failure"))
    with engine_for(pipeline_of(model), batch_size=1, batch_wait_ms=0) as engine:
        with pytest.raises(DeviceFault):
            list(engine.run(jpegs(tmp_path, 6)))
        for _ in range(100):  # the queued items settle on the device thread
            stats = engine.stats()
            if stats.images_in_flight == stats.fetching == 0:
                break
            threading.Event().wait(0.05)
    assert model.calls == 1
    assert stats.images_in_flight == stats.bytes_in_flight == stats.fetching == 0


def test_a_cuda_error_where_a_frame_is_decoded_or_pinned_is_a_device_fault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pin_memory is a CUDA call: a sticky error can surface in the decode pool, and must not
    make a readable capture UNDECODABLE."""
    import inference.engine as engine_module

    def pin_fails(*_: object) -> torch.Tensor:
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine_module, "decode", pin_fails)
    model = ConstantBoxes(boxes=1)
    with engine_for(pipeline_of(model)) as engine:
        with pytest.raises(DeviceFault):
            list(engine.run(jpegs(tmp_path, 2)))
        assert engine.fault is not None and "illegal memory access" in engine.fault


def test_nvjpeg_failing_outside_any_file_sends_the_batch_to_the_cpu_decoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import inference.gpu_decode as gpu_decode_module

    def decoder_broken(*_: object) -> list[torch.Tensor | None]:
        raise RuntimeError("nvjpegCreateEx failed (simulated)")

    monkeypatch.setattr(gpu_decode_module, "decode_jpegs_on_device", decoder_broken)
    engine = engine_for(pipeline_of(ConstantBoxes(boxes=1)), batch_size=4)
    engine.gpu_decode = True
    with engine:
        results = list(engine.run(jpegs(tmp_path, 4)))
        stats = engine.stats()
    assert len(results) == 4 and all(r.ok for r in results)
    assert (stats.gpu_decoded, stats.gpu_refused) == (0, 4)
    assert stats.bytes_in_flight == stats.images_in_flight == 0


class OutOfMemoryAbove(ConstantBoxes):
    def __init__(self, limit: int) -> None:
        super().__init__(boxes=1)
        self.limit = limit

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        if len(images) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().forward(images)


def test_warm_up_goes_on_past_an_oom_at_batch_size_and_stops_at_one_at_batch_1() -> None:
    """Serving splits a batch that does not fit, so the start does too; a model that cannot
    take one frame cannot serve at all."""
    forward = ForwardOptions(crop_batch_size=4, compile=True, compile_backend="eager")
    fits_one = engine_for(pipeline_of(OutOfMemoryAbove(1)), batch_size=4, forward=forward)
    fits_one.start()
    fits_one.close()
    assert fits_one.warm_up_s > 0
    fits_none = engine_for(pipeline_of(OutOfMemoryAbove(0)), batch_size=4, forward=forward)
    with pytest.raises(EngineStartError, match="out of device memory on one dummy frame"):
        fits_none.start()
