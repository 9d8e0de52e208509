"""Named pipelines through a real worker: each job runs its own pipeline's weights, whatever the
worker's TRAPQ_* model settings; a pipeline that cannot load fails its own chunks with the
reason and the worker goes on with the next job's.

Two classifiers of one architecture differ only in a bias that makes one class win every crop,
so a job's labels show whose weights ran.
"""

from __future__ import annotations

import csv
import http.server
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
from moto.server import ThreadedMotoServer
from sqlalchemy import Engine, select

from db.imports import get_or_create_deployment, insert_captures
from db.models import Chunk, Classification, Detection
from db.pipelines import StoredPipeline
from db.session import make_sessionmaker
from inference.registry import REGISTRY
from inference.weights import load_labels
from tasks.exports.table import write_csv
from tasks.pipeline import add_named_pipeline
from tasks.producer import enqueue, producer_app
from tasks.queues import pipeline_queue
from tasks.routing import consumed_queues, forget_consumed
from tests.worker_jobs import job_state, settings_of, worker_env, write_jpegs

DEMO_CLASSIFIER = Path(REGISTRY["demo_classifier"].default_weights or "")


def biased_weights(path: Path, winner: int) -> Path:
    """The demo classifier with class `winner` scoring far above the other on every crop."""
    state = torch.load(DEMO_CLASSIFIER, map_location="cpu", weights_only=True)
    state["fc.bias"] = state["fc.bias"].clone()
    state["fc.bias"][winner] += 1000.0
    torch.save(state, path)
    return path


def add(env: dict[str, str], name: str, **overrides: Any) -> StoredPipeline:
    settings = settings_of(env).model_copy(update={
        "detector": "constant_boxes", "classifier": "demo_classifier", "random_weights": False,
        "weights_cache_dir": Path(env["TRAPQ_DATA_DIR"]) / "cli-weights",
    })
    stored, _ = add_named_pipeline(settings, name, overrides, description="test")
    return stored


def captures(engine: Engine, folder: Path, deployment: str, n: int) -> None:
    paths = write_jpegs(folder, n)
    with make_sessionmaker(engine).begin() as s:
        dep = get_or_create_deployment(s, deployment)
        insert_captures(s, dep, [{"uri": str(p), "captured_at": None, "width": None,
                                  "height": None} for p in paths])


def labels_of(engine: Engine, job_id: int) -> set[str]:
    with make_sessionmaker(engine)() as s:
        return set(s.scalars(
            select(Classification.label)
            .join(Detection, Detection.id == Classification.detection_id)
            .where(Detection.job_id == job_id)
        ))


def chunk_errors(engine: Engine, job_id: int) -> list[str]:
    with make_sessionmaker(engine)() as s:
        return [c or "" for c in s.scalars(select(Chunk.error).where(Chunk.job_id == job_id))]


def wait_ended(engine: Engine, job_ids: list[int], worker: Any, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(job_state(engine, j) in ("done", "failed") for j in job_ids):
            return
        assert worker.proc.poll() is None, worker.tail()
        time.sleep(0.2)
    raise AssertionError(f"jobs {job_ids} did not end:\n{worker.tail()}")


@pytest.fixture
def env(service_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """A worker whose own TRAPQ_* models are random ones no job here runs, with a weights
    cache of its own (nothing the CLI downloaded is there)."""
    if not DEMO_CLASSIFIER.is_file():
        pytest.skip("demo classifier not trained")
    return worker_env(service_env, TRAPQ_WEIGHTS_CACHE_DIR=str(tmp_path / "worker-weights"))


def test_two_jobs_of_two_classifiers_run_at_once_each_with_its_own_weights(
    tmp_path: Path, env: dict[str, str], clean_pg: Engine, worker_factory,
) -> None:
    first = add(env, "first", classifier_weights=str(biased_weights(tmp_path / "a.pt", 0)))
    second = add(env, "second", classifier_weights=str(biased_weights(tmp_path / "b.pt", 1)))
    captures(clean_pg, tmp_path / "images", "trap", 8)
    worker = worker_factory(env).start()
    s = settings_of(env)
    jobs = [enqueue(s, "trap", chunk_size=2, pipeline=p.label).job_id for p in (first, second)]
    assert None not in jobs
    wait_ended(clean_pg, jobs, worker)  # type: ignore[arg-type]

    assert [job_state(clean_pg, j) for j in jobs] == ["done", "done"]  # type: ignore[arg-type]
    labels = load_labels(REGISTRY["demo_classifier"].default_labels or "")
    assert labels_of(clean_pg, jobs[0]) == {labels[0]}  # type: ignore[arg-type]
    assert labels_of(clean_pg, jobs[1]) == {labels[1]}  # type: ignore[arg-type]
    exported = io.StringIO()
    with make_sessionmaker(clean_pg)() as session:
        write_csv(session, jobs[0], exported)  # type: ignore[arg-type]
    assert {row["pipeline"] for row in csv.DictReader(io.StringIO(exported.getvalue()))} == {
        first.label}
    # the worker now takes these pipelines' chunks from their own queues first
    forget_consumed()
    consumed = consumed_queues(producer_app(s))
    assert {pipeline_queue(s.queue, p.fingerprint) for p in (first, second)} <= consumed
    assert "is not the job's" not in worker.log_text()


class _Weights(http.server.BaseHTTPRequestHandler):
    """Serves /gone and /cut whole until `broken` is set; then /gone answers 404 and /cut
    sends half of what its Content-Length promised."""

    bodies: dict[str, bytes] = {}
    broken = False

    def do_GET(self) -> None:  # noqa: N802
        if self.broken and self.path == "/gone":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.bodies[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if self.broken and self.path == "/cut" else body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def weights_server(tmp_path: Path) -> Iterator[tuple[str, type[_Weights]]]:
    bodies = {"/gone": DEMO_CLASSIFIER.read_bytes(),
              "/cut": biased_weights(tmp_path / "cut.pt", 2).read_bytes()}
    handler = type("Handler", (_Weights,), {"bodies": bodies})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", handler
    finally:
        server.shutdown()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A moto S3 server on a loopback port, and the environment that points boto3 at it."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    aws = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "trapq-test",
           "AWS_SECRET_ACCESS_KEY": "trapq-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    for name, value in aws.items():
        monkeypatch.setenv(name, value)
    try:
        yield aws
    finally:
        server.stop()


def test_pipelines_that_cannot_load_fail_their_chunks_and_the_next_job_runs(
    tmp_path: Path, env: dict[str, str], clean_pg: Engine, worker_factory,
    weights_server: tuple[str, type[_Weights]], s3_env: dict[str, str],
) -> None:
    url, handler = weights_server
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="models")
    s3.put_object(Bucket="models", Key="w.pt",
                  Body=biased_weights(tmp_path / "s3.pt", 3).read_bytes())
    changed = biased_weights(tmp_path / "changed.pt", 0)
    refs = {
        "changed": add(env, "changed", classifier_weights=str(changed)).label,
        "gone": add(env, "gone", classifier_weights=f"{url}/gone").label,
        "cut": add(env, "cut", classifier_weights=f"{url}/cut").label,
        "nokey": add(env, "nokey", classifier_weights="s3://models/w.pt").label,
        "good": add(env, "good", classifier_weights=str(biased_weights(tmp_path / "g.pt", 1))
                    ).label,
    }
    biased_weights(changed, 1)  # the file changes after `pipelines add` hashed it
    handler.broken = True
    s3.delete_object(Bucket="models", Key="w.pt")
    captures(clean_pg, tmp_path / "images", "trap", 4)
    worker = worker_factory({**env, **s3_env}).start()
    s = settings_of(env)
    jobs = {name: enqueue(s, "trap", chunk_size=2, pipeline=ref).job_id
            for name, ref in refs.items()}
    wait_ended(clean_pg, list(jobs.values()), worker)  # type: ignore[arg-type]

    states = {name: job_state(clean_pg, j) for name, j in jobs.items()}  # type: ignore[arg-type]
    assert states == {"changed": "failed", "gone": "failed", "cut": "failed", "nokey": "failed",
                      "good": "done"}
    reasons = {name: chunk_errors(clean_pg, j) for name, j in jobs.items()}  # type: ignore[arg-type]
    assert all(
        "pipeline changed@1" in e and f"sha256 mismatch for {changed}" in e
        for e in reasons["changed"]
    ), reasons["changed"]
    assert all("pipeline gone@1" in e and "HTTP 404" in e for e in reasons["gone"])
    assert all("pipeline cut@1" in e and "cut short" in e for e in reasons["cut"]), reasons["cut"]
    assert all("pipeline nokey@1" in e and "S3 NoSuchKey" in e for e in reasons["nokey"]), (
        reasons["nokey"])
    assert worker.proc.poll() is None
