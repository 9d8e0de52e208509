"""The Procfile's worker and Flower, started by honcho, run a job that Flower's API reports.

Real processes against the real PostgreSQL and Redis: honcho starts `worker` and `flower` as an
operator would, the job is imported and enqueued through the `trapq` CLI, and everything is read
back through Flower's HTTP API with basic auth: the worker online, every chunk task SUCCESS
under a name that says its job and chunk, the task list's args and result columns, the
PROGRESS events the chunks sent, Prometheus metrics, and re-sending one chunk through
`/api/task/async-apply` as the README shows.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import requests
from PIL import Image
from sqlalchemy import Engine, select

from db.models import Chunk, Job
from db.states import ChunkState
from tasks.celery_app import PROCESS_CHUNK
from tests.services import free_port

pytestmark = pytest.mark.subprocess  # honcho, the Procfile's worker and Flower

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
AUTH = ("operator", "s3cret-flower")
STARTUP_S = 240
JOB_S = 300
T = TypeVar("T")


@dataclass
class Honcho:
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def child_groups(self) -> set[int]:
        """Honcho puts each Procfile entry in its own session; their ids are in its log."""
        return {int(pid) for pid in re.findall(r"started \(pid=(\d+)\)", self.output())}

    def stop(self) -> None:
        """Warm shutdown through honcho; then SIGKILL what is left, including the Celery
        workers that `trapq worker` starts in sessions of their own."""
        try:
            family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        groups = self.child_groups()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        for group in [self.proc.pid, *groups]:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for process in family:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=10)


def wait_for(probe: Callable[[], T | None], timeout_s: float, what: str, honcho: Honcho) -> T:
    """Poll `probe` until it returns a value; fail with honcho's output if it never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if honcho.proc.poll() is not None:
            pytest.fail(f"honcho exited while waiting for {what}:\n{honcho.output()[-4000:]}")
        value = probe()
        if value is not None:
            return value
        time.sleep(0.5)
    pytest.fail(f"no {what} after {timeout_s:.0f} s:\n{honcho.output()[-4000:]}")


def write_captures(folder: Path, n: int) -> None:
    folder.mkdir()
    for i in range(n):
        shade = 40 + 30 * i
        Image.new("RGB", (320, 240), (shade, 200 - shade, 120)).save(folder / f"c{i:02d}.jpg")


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [str(BIN / "trapq"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"trapq {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture
def procfile_env(service_env: dict[str, str]) -> dict[str, str]:
    env = dict(service_env)
    env.update(
        FLOWER_USER=AUTH[0],
        FLOWER_PASSWORD=AUTH[1],
        FLOWER_PORT=str(free_port()),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        # A zero-cost detector and a small random classifier: this test is about the
        # processes, not accuracy; frequent heartbeats so even a short chunk reports progress.
        TRAPQ_DETECTOR="constant_boxes",
        TRAPQ_CLASSIFIER="demo_classifier",
        TRAPQ_RANDOM_WEIGHTS="true",
        TRAPQ_HEARTBEAT_S="0.2",
        TRAPQ_BATCH_SIZE="2",
        TRAPQ_FETCH_THREADS="2",
        TRAPQ_DECODE_THREADS="1",
    )
    return env


@pytest.fixture
def honcho(procfile_env: dict[str, str], tmp_path: Path) -> Iterator[Honcho]:
    no_dotenv = tmp_path / "empty.env"
    no_dotenv.write_text("")
    log = tmp_path / "honcho.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "honcho"), "--no-colour", "-e", str(no_dotenv), "-f",
             str(ROOT / "Procfile"), "-d", str(ROOT), "start", "worker", "flower"],
            env=procfile_env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = Honcho(proc, log)
    try:
        yield running
    finally:
        running.stop()


class Flower:
    def __init__(self, port: str) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, auth: tuple[str, str] | None = AUTH, **params: Any) -> Any:
        return requests.get(self.base + path, auth=auth, params=params, timeout=10)

    def api(self, path: str, **params: Any) -> Any:
        try:
            response = self.get(path, **params)
        except requests.ConnectionError:
            return None
        response.raise_for_status()
        return response.json()


def test_procfile_worker_runs_a_job_that_flower_reports_with_progress(
    honcho: Honcho, procfile_env: dict[str, str], clean_pg: Engine, tmp_path: Path
) -> None:
    flower = Flower(procfile_env["FLOWER_PORT"])
    wait_for(lambda: "ready." in honcho.output() or None, STARTUP_S, "worker ready", honcho)
    wait_for(lambda: flower.api("/api/workers", status="true") or None, 60, "workers", honcho)

    captures = tmp_path / "captures"
    write_captures(captures, 6)
    cli(procfile_env, "import", str(captures), "--deployment", "flower-night")
    cli(procfile_env, "enqueue", "flower-night", "--chunk-size", "2")
    with clean_pg.connect() as conn:
        job_id = conn.execute(select(Job.id)).scalar_one()
        rows = conn.execute(
            select(Chunk.id, Chunk.task_id, Chunk.seq).where(Chunk.job_id == job_id)
        ).all()
    chunks = [(chunk_id, task_id) for chunk_id, task_id, _ in rows]
    shown_as = {  # the pipeline (NAME@VERSION), the job and the chunk
        chunk_id: f"default@1 · job {job_id} · chunk {seq + 1}/3" for chunk_id, _, seq in rows
    }
    assert len(chunks) == 3 and all(task_id for _, task_id in chunks)

    def task_infos() -> dict[int, dict[str, Any]] | None:
        infos = {}
        for chunk_id, task_id in chunks:
            response = flower.get(f"/api/task/info/{task_id}")
            if response.status_code != 200:
                return None
            info = response.json()
            if info["state"] in ("FAILURE", "REVOKED", "REJECTED"):
                pytest.fail(f"chunk {chunk_id} ended {info['state']}: {info.get('exception')}")
            if info["state"] != "SUCCESS":
                return None
            infos[chunk_id] = info
        return infos

    infos = wait_for(task_infos, JOB_S, "SUCCESS of every chunk task in Flower", honcho)
    for chunk_id, info in infos.items():
        assert info["name"] == shown_as[chunk_id], "Flower names the job and the chunk"
        assert str(chunk_id) in info["args"], "the chunk id is readable in Flower"
        assert f"'job_id': {job_id}" in info["result"], "so is the job id"
    with clean_pg.connect() as conn:
        states = conn.execute(select(Chunk.state).where(Chunk.job_id == job_id)).scalars().all()
    assert states == [ChunkState.DONE] * 3

    workers = {info["worker"] for info in infos.values()}
    online = flower.api("/api/workers", status="true")
    assert all(online.get(worker) is True for worker in workers), (workers, online)
    listed = flower.api("/api/tasks")
    assert {listed[task_id]["name"] for _, task_id in chunks} == set(shown_as.values())
    page = flower.get("/tasks")
    assert page.status_code == 200
    for column in ("name", "args", "result"):
        assert f'data-column="{column}"' in page.text, f"the task list shows {column}"

    # Re-send one chunk from Flower's API, as the README shows: it runs again and succeeds.
    chunk_id, _ = chunks[0]
    sent = requests.post(
        f"{flower.base}/api/task/async-apply/{PROCESS_CHUNK}",
        json={"args": [chunk_id]}, auth=AUTH, timeout=10,
    )
    assert sent.status_code == 200, sent.text
    resent = sent.json()["task-id"]

    def resent_succeeded() -> bool | None:
        response = flower.get(f"/api/task/info/{resent}")
        return response.status_code == 200 and response.json()["state"] == "SUCCESS" or None

    wait_for(resent_succeeded, JOB_S, "SUCCESS of the re-sent chunk", honcho)

    # /metrics is open to Prometheus; the API is not open without the password.
    assert flower.get("/api/workers", auth=None).status_code == 401
    assert flower.get("/api/tasks", auth=("operator", "wrong")).status_code == 401
    metrics = flower.get("/metrics", auth=None)
    assert metrics.status_code == 200
    # Each chunk's progress reports reach Flower as task-progress events (state PROGRESS),
    # labelled with the chunk's name. Prometheus' text has no charset: decode it as UTF-8.
    progress = [
        line for line in metrics.content.decode().splitlines()
        if line.startswith("flower_events_total{")
        and 'type="task-progress"' in line and f'task="default@1 · job {job_id} · chunk ' in line
        and any(f'worker="{w}"' in line for w in workers)
    ]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in progress) >= len(chunks), progress
