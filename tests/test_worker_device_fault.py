"""A sticky CUDA error in a real worker under `trapq worker`: the process exits with its own
code, the supervisor starts a fresh one, the chunk is retried there, and no capture is lost,
failed or written twice.

The fault is injected as CUDA reports it: a TorchScript detector, loaded from a weight file
like any user's, raises "CUDA error: an illegal memory access was encountered" when it sees an
all-magenta frame. The image server hands that frame out once, so the first process faults and
the retried chunk, fetched afresh by the next process, goes through.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from sqlalchemy import Engine, select
from torch import nn

from db.models import Chunk
from tasks.worker.exits import DEVICE_FAULT_EXIT, LOAD_FAILED_EXIT
from tests.local_http import QuietHandler, serving
from tests.trapq_cli import TRAPQ
from tests.worker_jobs import (
    BOXES_PER_IMAGE,
    ENDED,
    detections_per_capture,
    env_pipeline,
    item_states,
    job_state,
    jpeg_bytes,
    make_job,
    send,
    worker_env,
)
from tests.worker_process import wait_for


class FaultsOnMagenta(nn.Module):
    """BOXES_PER_IMAGE boxes on a grid, as constant_boxes gives; an illegal address on magenta."""

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out: list[dict[str, torch.Tensor]] = []
        for image in images:
            mean = image.mean(dim=(1, 2))
            if bool(mean[0] > 0.9) and bool(mean[1] < 0.1) and bool(mean[2] > 0.9):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            h, w = image.shape[-2], image.shape[-1]
            cell = torch.arange(20, device=image.device)
            x1 = (cell % 5).float() * (w / 5)
            y1 = torch.div(cell, 5, rounding_mode="floor").float() * (h / 4)
            boxes = torch.stack([x1, y1, x1 + w / 5, y1 + h / 4], dim=1)
            out.append({
                "boxes": boxes,
                "scores": torch.full((20,), 0.9, device=image.device),
                "labels": torch.ones(20, dtype=torch.int64, device=image.device),
            })
        return out


@pytest.fixture
def image_server() -> Iterator[tuple[str, dict[str, int]]]:
    """/poison.jpg is magenta on its first fetch and an ordinary capture after; /n.jpg are
    ordinary captures. Yields the base URL and the fetch counts."""
    hits: dict[str, int] = {}
    lock = threading.Lock()
    ordinary = jpeg_bytes(160, 120)
    buf = io.BytesIO()
    Image.new("RGB", (160, 120), (255, 0, 255)).save(buf, "JPEG", quality=95)
    magenta = buf.getvalue()

    class Handler(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802
            with lock:
                hits[self.path] = hits.get(self.path, 0) + 1
                first = hits[self.path] == 1
            body = magenta if self.path == "/poison.jpg" and first else ordinary
            self.send_body(200, body, "image/jpeg")

    with serving(Handler) as base:
        yield base, hits


def test_a_sticky_cuda_error_restarts_the_worker_and_its_chunk_is_redone_with_none_lost(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory,
    image_server: tuple[str, dict[str, int]],
) -> None:
    base, hits = image_server
    weights = tmp_path / "faulting_detector.pt"
    torch.jit.script(FaultsOnMagenta().eval()).save(str(weights))
    uris = [f"{base}/{i}.jpg" for i in range(3)] + [f"{base}/poison.jpg"]
    env = worker_env(
        service_env,
        TRAPQ_DETECTOR="fasterrcnn_mobilenet_v3_large_320_fpn",
        TRAPQ_DETECTOR_WEIGHTS=str(weights),
        TRAPQ_RANDOM_WEIGHTS="false",
        TRAPQ_WORKER_CRASH_PAUSE_S="0.5",
    )
    job = make_job(clean_pg, uris, chunk_size=4, spec=env_pipeline(env))
    # No dispatcher: the test sends the chunks, and one would send each again.
    argv = [str(TRAPQ), "worker", "--gpus", "cpu", "--concurrency", "1", "--no-dispatch"]
    supervisor = worker_factory(env, argv=argv)
    try:
        supervisor.start()
        send(env, clean_pg, job.chunk_ids)
        wait_for(lambda: job_state(clean_pg, job.job_id) in ENDED, 180, "job end",
                 on_timeout=supervisor.tail)
        log = supervisor.log_text()
    finally:
        supervisor.kill()
    assert job_state(clean_pg, job.job_id) == "done", log[-3000:]
    assert item_states(clean_pg, job.job_id) == {"done": 4}, log[-4000:]  # none failed
    per_capture = detections_per_capture(clean_pg, job.job_id)
    assert len(per_capture) == 4 and set(per_capture.values()) == {BOXES_PER_IMAGE}
    assert "illegal memory access" in log
    assert f"exit code {DEVICE_FAULT_EXIT}" in log  # the worker said why it stops
    assert "CUDA error that lasts for its process" in log  # the supervisor saw that code
    assert log.count("started cpu@") >= 2  # and started a fresh process
    assert hits["/poison.jpg"] == 2  # fetched again by the retry, in the new process
    with clean_pg.connect() as conn:
        [chunk] = conn.execute(select(Chunk).where(Chunk.id == job.chunk_ids[0])).all()
    assert chunk.state == "done"


def test_a_worker_whose_compiler_fails_stops_at_start_with_one_line(
    service_env: dict[str, str], worker_factory,
) -> None:
    env = worker_env(service_env, TRAPQ_COMPILE="true", TRAPQ_COMPILE_BACKEND="no_such_backend")
    worker = worker_factory(env)
    with pytest.raises(RuntimeError, match=f"worker exited {LOAD_FAILED_EXIT}"):
        worker.start()
    [line] = [ln for ln in worker.log_text().splitlines() if "cannot start" in ln]
    assert "torch.compile failed on a dummy batch at start-up" in line
    assert "TRAPQ_COMPILE=false" in line and "Traceback" not in worker.log_text()
