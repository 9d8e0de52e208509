"""Flat memory: the decoded frames alive never pass the in-flight bound, and a worker past its
memory limit restarts without losing or doubling a chunk.

The engine's own test checks its bookkeeping (the in-flight counters); here the decoded tensors
themselves are counted, by weak references, so a frame still referenced after its share of the
bound was released counts too. The worker tests run `trapq worker` (the supervisor and its
Celery worker) on real PostgreSQL and Redis with TRAPQ_MAX_MEMORY_MB=1, past which every worker
process is over its limit after its first chunk.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import psutil
import pytest
import torch
from sqlalchemy import Engine

import inference.engine
from inference.engine import Engine as InferenceEngine
from inference.engine import EngineConfig
from inference.fetch import FetchPolicy
from inference.registry import ConstantBoxes, Pipeline, load_pipeline, model_source
from inference.types import WorkItem
from tests.inference_fixtures import encode, structured_image
from tests.local_http import QuietHandler, serving
from tests.worker_jobs import (
    BOXES_PER_IMAGE,
    ENDED,
    chunk_rows,
    detections_per_capture,
    item_states,
    job_state,
    jpeg_bytes,
    make_job,
    send,
    worker_env,
    write_jpegs,
)
from tests.worker_process import WorkerProcess, wait_for

torch.set_num_threads(1)

WIDTH, HEIGHT = 64, 48
FRAME_BYTES = WIDTH * HEIGHT * 3


class SlowBoxes(ConstantBoxes):
    """The model drains far slower than two fetch and decode threads fill."""

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        time.sleep(0.03)
        return super().forward(images)


class LiveFrames:
    """Decoded frames still referenced anywhere, counted by weak references."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.frames = self.bytes = self.peak_frames = self.peak_bytes = 0

    def track(self, frame: torch.Tensor) -> torch.Tensor:
        n = frame.nbytes
        with self._lock:
            self.frames += 1
            self.bytes += n
            self.peak_frames = max(self.peak_frames, self.frames)
            self.peak_bytes = max(self.peak_bytes, self.bytes)
        weakref.finalize(frame, self._gone, n)
        return frame

    def _gone(self, n: int) -> None:
        with self._lock:
            self.frames -= 1
            self.bytes -= n


@pytest.fixture
def live_frames(monkeypatch: pytest.MonkeyPatch) -> LiveFrames:
    live = LiveFrames()
    decode = inference.engine.decode
    monkeypatch.setattr(inference.engine, "decode", lambda *a: live.track(decode(*a)))
    return live


@pytest.fixture(scope="module")
def slow_pipeline() -> Pipeline:
    pipe = load_pipeline(
        model_source("constant_boxes", "detector"),
        model_source("demo_classifier", "classifier", random_weights=True),
        device="cpu",
    )
    detector = dataclasses.replace(pipe.detector, module=SlowBoxes(boxes=2).eval())
    return dataclasses.replace(pipe, detector=detector, box_threshold=0.0)


@pytest.mark.parametrize(
    "max_images, max_frames_of_bytes, batch_size, callers",
    [(3, 100, 2, 1), (4, 100, 4, 1), (16, 3, 4, 1), (5, 100, 4, 3)],
    ids=["images-bound", "batch-as-large-as-the-bound", "bytes-bound", "three-callers"],
)
def test_decoded_frames_alive_never_exceed_the_in_flight_bound(
    tmp_path: Path, live_frames: LiveFrames, slow_pipeline: Pipeline,
    max_images: int, max_frames_of_bytes: int, batch_size: int, callers: int,
) -> None:
    png = tmp_path / "a.png"  # PNG: decoded on the CPU by decode(), whatever the device
    png.write_bytes(encode(structured_image(WIDTH, HEIGHT, seed=0), "PNG"))
    config = EngineConfig(
        fetch=FetchPolicy(pool_size=4), batch_size=batch_size, batch_wait_ms=5, decode_threads=2,
        max_images_in_flight=max_images, max_bytes_in_flight=max_frames_of_bytes * FRAME_BYTES,
    )
    got: dict[int, int] = {}
    with InferenceEngine(slow_pipeline, config) as engine:

        def caller(n: int) -> None:
            items = (WorkItem(n * 1000 + i, str(png)) for i in range(24))
            got[n] = sum(1 for r in engine.run(items) if r.ok)

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    assert got == {n: 24 for n in range(callers)}
    bound = min(max_images, max_frames_of_bytes)
    assert live_frames.peak_frames == bound  # reached (decode outran the model), never passed
    assert live_frames.peak_bytes <= max_frames_of_bytes * FRAME_BYTES


# the memory guard, with real workers

SLOW_IMAGE_S = 4.0


@pytest.fixture
def slow_images() -> Iterator[str]:
    """HTTP server of small JPEGs, each answered after SLOW_IMAGE_S: a chunk still in hand
    when its neighbour's end trips the memory guard."""
    body = jpeg_bytes(160, 120)

    class Handler(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            time.sleep(SLOW_IMAGE_S)
            self.send_body(200, body, "image/jpeg")

    with serving(Handler) as base:
        yield base


@pytest.fixture
def supervised(
    worker_factory: Callable[..., WorkerProcess],
) -> Iterator[Callable[..., WorkerProcess]]:
    """`trapq worker --gpus cpu` as a subprocess; its Celery workers run in sessions of their
    own, so they are stopped through it and, failing that, killed one by one."""
    made: list[WorkerProcess] = []
    seen: set[int] = set()

    def make(env: dict[str, str], *options: str) -> WorkerProcess:
        trapq = str(Path(sys.executable).with_name("trapq"))
        # No dispatcher: the tests send their chunks themselves (tests.worker_jobs.send), and
        # one beside them would send each again under a new task id.
        argv = [trapq, "worker", "--gpus", "cpu", "--no-dispatch", *options]
        worker = worker_factory(env, argv=argv)
        made.append(worker)
        return worker

    def descendants() -> None:
        for worker in made:
            if worker.proc is not None and worker.proc.poll() is None:
                seen.update(p.pid for p in psutil.Process(worker.pid).children(recursive=True))

    yield make
    descendants()
    for worker in made:
        worker.stop(timeout=60)
    for pid in seen:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


STARTED = re.compile(r"\[([\d-]+ [\d:]+),(\d+): INFO/trapq\] started cpu@\S+ \(pid (\d+)")


def starts(log: str) -> list[tuple[float, int]]:
    """(epoch seconds, pid) of each Celery worker process the supervisor started, in order."""
    return [
        (datetime.strptime(at, "%Y-%m-%d %H:%M:%S").timestamp() + int(ms) / 1000, int(pid))
        for at, ms, pid in STARTED.findall(log)
    ]


def started_pids(log: str) -> list[int]:
    return [pid for _, pid in starts(log)]


def engine_pids(log: str) -> list[int]:
    """Processes that loaded an engine (prefork: each pool child)."""
    return [int(p) for p in re.findall(r"trapq engine loaded in pid (\d+)", log)]


def _wait_job_done(engine: Engine, job_id: int, worker: WorkerProcess) -> None:
    wait_for(lambda: job_state(engine, job_id) in ENDED, 240, f"job {job_id} to end",
             every=0.5, on_timeout=worker.tail)
    assert job_state(engine, job_id) == "done", worker.tail()


def _assert_every_capture_done_once(engine: Engine, job_id: int, n: int) -> None:
    assert item_states(engine, job_id) == {"done": n}
    assert detections_per_capture(engine, job_id) == {
        cid: BOXES_PER_IMAGE for cid in detections_per_capture(engine, job_id)
    }
    assert len(detections_per_capture(engine, job_id)) == n


def test_threads_worker_past_its_memory_limit_restarts_and_finishes_the_chunk_in_hand(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, supervised,
    slow_images: str,
) -> None:
    """The first chunk fetches slowly; the second ends first and trips the guard. The worker
    stops warmly, so the slow chunk is finished by the same process, before `trapq worker`
    starts a new one for the chunks still queued."""
    fast = write_jpegs(tmp_path / "images", 12)
    uris = [f"{slow_images}/slow{i}.jpg" for i in range(4)] + [str(p) for p in fast]
    job = make_job(clean_pg, uris, chunk_size=4)
    env = worker_env(service_env, TRAPQ_MAX_MEMORY_MB="1", TRAPQ_POOL="threads",
                     TRAPQ_CONCURRENCY="2", TRAPQ_FETCH_THREADS="8")
    worker = supervised(env).start()
    first_pid = started_pids(worker.log_text())[0]
    send(env, clean_pg, job.chunk_ids)

    _wait_job_done(clean_pg, job.job_id, worker)

    _assert_every_capture_done_once(clean_pg, job.job_id, len(uris))
    slow_chunk, *others = chunk_rows(clean_pg, job.job_id)
    # Every chunk's end trips the guard; one ended while the slow chunk ran, and the slow
    # chunk still ended before the first process was replaced.
    assert any(slow_chunk.started_at < c.finished_at < slow_chunk.finished_at for c in others)
    log = worker.log_text()
    assert "stopped itself for the memory guard" in log
    (_, pid), (restarted_at, second_pid), *_ = starts(log)
    assert pid == first_pid != second_pid
    assert slow_chunk.state == "done" and slow_chunk.finished_at.timestamp() < restarted_at
    assert not psutil.pid_exists(first_pid) or psutil.Process(first_pid).status() == "zombie"


def test_prefork_child_past_its_memory_limit_is_replaced_and_no_chunk_is_lost(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, supervised,
) -> None:
    """Celery's own worker_max_memory_per_child: each pool child ends after its chunk."""
    paths = write_jpegs(tmp_path / "images", 12)
    job = make_job(clean_pg, [str(p) for p in paths], chunk_size=4)
    env = worker_env(service_env, TRAPQ_MAX_MEMORY_MB="1")
    worker = supervised(env, "--pool", "prefork", "--concurrency", "1").start()
    send(env, clean_pg, job.chunk_ids)

    _wait_job_done(clean_pg, job.job_id, worker)

    _assert_every_capture_done_once(clean_pg, job.job_id, len(paths))
    assert [c.state for c in chunk_rows(clean_pg, job.job_id)] == ["done"] * 3
    log = worker.log_text()
    assert len(set(started_pids(log))) == 1  # the Celery parent stayed; its children changed
    assert len(set(engine_pids(log))) >= 3, log
