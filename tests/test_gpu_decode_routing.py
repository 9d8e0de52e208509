"""nvJPEG gets only what it decodes faithfully, on its own thread; everything else, and whatever
it refuses, is decoded on the CPU off the device thread, failing alone.

torchvision's decode_jpeg batches on a CPU exactly as on CUDA, so with the engine's GPU-decode
path turned on these tests run the routing, the batch -> single -> CPU fallback and the
hand-off between threads; only the CUDA streams themselves wait for bench/gpu_check.py.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import inference.decode as decode_module
import inference.engine as engine_module
from inference.decode import decode, decode_jpegs_on_device, nvjpeg_decodable, read_header
from inference.registry import ConstantBoxes
from inference.types import ErrorKind, WorkItem
from tests.inference_fixtures import encode, structured_image
from tests.test_engine_device_faults import engine_for, pipeline_of

torch.set_num_threads(1)
CPU = torch.device("cpu")


def variants() -> dict[str, tuple[bytes, bool]]:
    """Each variant's bytes and whether nvJPEG may have it."""
    im = structured_image(96, 64, seed=5)
    exif = im.getexif()
    exif[0x0112] = 6
    baseline = encode(im)
    return {
        "baseline": (baseline, True),
        "grey": (encode(im.convert("L")), True),
        "exif_rotated": (encode(im, exif=exif), True),
        "optimized_huffman": (encode(im, optimize=True), True),
        "cmyk": (encode(im.convert("CMYK")), False),
        "progressive": (encode(im, progressive=True), False),
        "truncated": (baseline[: len(baseline) * 2 // 3], False),
        "bytes_after_eoi": (baseline + b"\0" * 16, False),
        "png": (encode(im, "PNG"), False),
    }


@pytest.mark.parametrize("name", list(variants()))
def test_only_baseline_8_bit_grey_or_colour_jpegs_ending_in_eoi_are_routed_to_nvjpeg(
    name: str,
) -> None:
    data, routed = variants()[name]
    assert nvjpeg_decodable(data) is routed
    assert read_header(data, 10**8, name).gpu_decodable is routed


class Refuses:
    """torchvision's decode_jpeg, except that it fails on one file, alone or in a batch, as
    nvJPEG fails a whole batch for one bad bitstream. Records every call."""

    def __init__(self, bad: bytes) -> None:
        self.bad = bad
        self.real: Callable[..., Any] = decode_module.decode_jpeg
        self.calls: list[tuple[int, str]] = []  # (files in the call, thread)

    def __call__(self, data: Any, **kwargs: Any) -> Any:
        batch = data if isinstance(data, list) else [data]
        self.calls.append((len(batch), threading.current_thread().name))
        if any(bytes(t.numpy()) == self.bad for t in batch):
            raise RuntimeError("Error while decoding JPEG images: nvjpeg status 6 (simulated)")
        return self.real(data, **kwargs)


def test_a_batch_refused_for_one_file_decodes_the_rest_alone_and_leaves_that_one_to_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    datas = [encode(structured_image(64, 48, seed=i)) for i in range(8)]
    headers = [read_header(d, 10**8, str(i)) for i, d in enumerate(datas)]
    refuses = Refuses(datas[3])
    monkeypatch.setattr(decode_module, "decode_jpeg", refuses)
    images = decode_jpegs_on_device(datas, headers, CPU)
    assert [len_ for len_, _ in refuses.calls] == [8] + [1] * 8  # batch, then one by one
    assert images[3] is None
    for i, image in enumerate(images):
        if i != 3:
            assert image is not None
            assert torch.equal(image, decode(datas[i], headers[i], str(i)))


def _write(tmp_path: Path, files: dict[str, bytes]) -> list[WorkItem]:
    items = []
    for i, (name, data) in enumerate(files.items()):
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(data)
        items.append(WorkItem(i, str(path)))
    return items


def _cpu_decodes(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Threads that ran the engine's CPU decoder."""
    threads: Counter[str] = Counter()
    real = engine_module.decode

    def recorded(*args: Any) -> torch.Tensor:
        threads[threading.current_thread().name.rsplit("_", 1)[0]] += 1
        return real(*args)

    monkeypatch.setattr(engine_module, "decode", recorded)
    return threads


def test_one_bad_file_in_a_batch_of_eight_fails_alone_and_the_seven_decode_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = {f"good{i}": encode(structured_image(320, 240, seed=i)) for i in range(7)}
    truncated = good["good0"][: len(good["good0"]) * 2 // 3]  # its header intact
    assert read_header(truncated, 10**8, "truncated").format == "JPEG"
    items = _write(tmp_path, {**good, "truncated": truncated})
    refuses = Refuses(b"")  # refuses nothing; records the calls
    monkeypatch.setattr(decode_module, "decode_jpeg", refuses)
    cpu = _cpu_decodes(monkeypatch)
    engine = engine_for(pipeline_of(ConstantBoxes(boxes=2)), batch_size=8, decode_threads=2)
    engine.gpu_decode = True
    with engine:
        results = {r.key: r for r in engine.run(items)}
        stats = engine.stats()
    assert results[7].error_kind == ErrorKind.UNDECODABLE
    assert all(results[i].ok and len(results[i].detections) == 2 for i in range(7))
    assert sum(n for n, _ in refuses.calls) == 7  # each good file went to the GPU path once
    assert {thread for _, thread in refuses.calls} == {"trapq-gpu-decode"}
    assert dict(cpu) == {"trapq-decode": 1}  # the truncated file, on a decode pool thread
    assert stats.images_in_flight == stats.bytes_in_flight == 0
    assert (stats.gpu_decoded, stats.gpu_refused) == (7, 0)
    # The eight were held together (one batch); those for nvJPEG were charged their encoded
    # bytes, the truncated one its decoded frame: far under eight decoded frames.
    frame = 320 * 240 * 3
    assert stats.bytes_in_flight_peak <= sum(len(d) for d in good.values()) + frame < 2 * frame


def test_a_file_nvjpeg_refuses_is_decoded_on_the_cpu_off_the_device_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {f"f{i}": encode(structured_image(64, 48, seed=20 + i)) for i in range(4)}
    items = _write(tmp_path, files)
    refuses = Refuses(files["f2"])
    monkeypatch.setattr(decode_module, "decode_jpeg", refuses)
    cpu = _cpu_decodes(monkeypatch)
    engine = engine_for(pipeline_of(ConstantBoxes(boxes=1)), batch_size=4)
    engine.gpu_decode = True
    with engine:
        results = {r.key: r for r in engine.run(items)}
        stats = engine.stats()
    assert all(r.ok and len(r.detections) == 1 for r in results.values())
    assert (results[2].width, results[2].height) == (64, 48)
    assert dict(cpu) == {"trapq-gpu-decode": 1}  # the refused one, never "trapq-engine"
    assert stats.bytes_in_flight == 0
    assert (stats.gpu_decoded, stats.gpu_refused) == (3, 1)


def test_frames_from_the_gpu_path_are_upright_and_equal_the_cpu_decode(
    tmp_path: Path,
) -> None:
    im = structured_image(96, 64, seed=9)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(im, exif=exif)
    [item] = _write(tmp_path, {"rotated": data})
    engine = engine_for(pipeline_of(ConstantBoxes(boxes=1)))
    engine.gpu_decode = True
    with engine:
        [result] = list(engine.run([item]))
    assert (result.width, result.height) == (64, 96)
    header = read_header(data, 10**8, "rotated")
    upright = decode(data, header, "rotated")
    [gpu_path] = decode_jpegs_on_device([data], [header], CPU)
    assert gpu_path is not None and torch.equal(gpu_path, upright)
    assert upright.shape[1:] == Image.open(tmp_path / "rotated.jpg").size
