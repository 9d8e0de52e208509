"""The overhead ceiling of the worker: everything that is not the model.

A real Celery worker (subprocess, threads pool) on Redis and PostgreSQL processes a job of
small JPEGs with zero-cost models: the `constant_boxes` detector (20 boxes per image) and a
TorchScript classifier that returns constant logits. What is left is fetch, decode, crops,
queueing, claims and the database writes. Side by side in one run it measures:

  (a) the engine alone, in this process, over the same files (no queue, no database);
  (b) the database writes alone: write_results of the same number of captures x 20 boxes,
      beside a raw COPY of the same rows (bench.writes);
  (c) the real worker end to end, from the first claim to the job's end.

and prints (c) against (a) and (b). Uses a fresh temporary database and queue, removed after.

    .venv/bin/python -m bench.worker [--images 2000] [--chunk-size 200] [--concurrency 2]
                                     [--pool threads|prefork|solo]

Environment: TRAPQ_TEST_PG_URL and TRAPQ_TEST_REDIS_URL, as the tests use.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from sqlalchemy import Engine, func, select
from torch import nn

from bench.writes import bench_writes, print_figures
from db.models import Classification, Detection, Job
from db.session import make_engine
from inference.engine import Engine as InferenceEngine
from inference.registry import load_pipeline
from inference.types import WorkItem
from tasks.settings import Settings
from tasks.worker_boot import engine_config
from tests.services import REDIS_URL, service_env, temporary_database, temporary_queue
from tests.worker_jobs import make_job, send, write_jpegs
from tests.worker_process import WorkerProcess, wait_for

BOXES = 20


class ConstantLogits(nn.Module):
    """A classifier that costs nothing: the same two logits for every crop."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[2.0, 0.0]]).expand(x.shape[0], 2)


def zero_cost_classifier(folder: Path) -> tuple[Path, Path]:
    weights, labels = folder / "constant_classifier.pt", folder / "labels.txt"
    torch.jit.script(ConstantLogits()).save(str(weights))
    labels.write_text("moth\nnonmoth\n")
    return weights, labels


def bench_engine(settings: Settings, paths: list[Path]) -> float:
    """(a) images/s of the engine alone over the files."""
    pipeline = load_pipeline(
        detector=settings.detector, classifier=settings.classifier, device="cpu",
        classifier_weights=settings.classifier_weights,
        classifier_labels=settings.classifier_labels,
    )
    engine = InferenceEngine(pipeline, engine_config(settings))
    engine.start()
    try:
        t0 = time.perf_counter()
        results = list(engine.run(WorkItem(i, str(p)) for i, p in enumerate(paths)))
        elapsed = time.perf_counter() - t0
    finally:
        engine.close()
    assert all(r.ok and len(r.detections) == BOXES for r in results)
    return len(paths) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--chunk-size", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--pool", choices=["threads", "prefork", "solo"], default="threads")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=192)
    args = parser.parse_args()

    torch.set_num_threads(1)
    with (
        temporary_database("trapq_bench") as url,
        temporary_queue("trapq-bench") as queue,
        tempfile.TemporaryDirectory(prefix="trapq-bench-") as tmp,
    ):
        run(args, url, queue, Path(tmp))


def run(args: argparse.Namespace, url: str, queue: str, folder: Path) -> None:
    engine = make_engine(url)
    paths = write_jpegs(folder / "images", args.images, args.width, args.height)
    weights, labels = zero_cost_classifier(folder)
    env = service_env(
        folder / "data", url, REDIS_URL, queue,
        TRAPQ_DETECTOR="constant_boxes",
        TRAPQ_CLASSIFIER="demo_classifier",
        TRAPQ_CLASSIFIER_WEIGHTS=str(weights),
        TRAPQ_CLASSIFIER_LABELS=str(labels),
        TRAPQ_BATCH_SIZE="32",
        TRAPQ_MAX_IMAGES_IN_FLIGHT="64",
        TRAPQ_FETCH_THREADS="4",
        TRAPQ_DECODE_THREADS="2",
        TRAPQ_TOP_K="1",
    )
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        **{k[6:].lower(): v for k, v in env.items() if k.startswith("TRAPQ_")},
    )
    engine_ips = bench_engine(settings, paths)
    print(f"(a) engine alone:        {engine_ips:8.0f} captures/s", flush=True)
    writes = bench_writes(engine, [str(p) for p in paths], settings.write_batch_size)
    print_figures(writes)
    writes_cps = writes.captures / writes.write_s

    job = make_job(engine, [str(p) for p in paths], chunk_size=args.chunk_size)
    worker = WorkerProcess(env, folder / "worker.log", pool=args.pool,
                           concurrency=args.concurrency)
    try:
        worker.start()
        send(env, engine, job.chunk_ids)
        wait_for(lambda: _job_state(engine, job.job_id) in ("done", "failed"), 900,
                 "the job", every=0.5, on_timeout=worker.tail)
        started, finished = _job_times(engine, job.job_id)
        wall = (finished - started).total_seconds()
        rows, class_rows = _rows(engine, job.job_id)
        worker.stop()
    finally:
        worker.kill()
        engine.dispose()
    cps, rps = args.images / wall, rows / wall
    print(f"(c) worker end to end:   {cps:8.0f} captures/s ({rps:.0f} detection rows/s "
          f"+ as many classification rows; {rows} + {class_rows} rows in {wall:.2f}s, "
          f"chunk size {args.chunk_size}, {args.pool} x {args.concurrency})")
    print(f"worker / engine alone:   {cps / engine_ips:8.2f}")
    print(f"worker / writes alone:   {cps / writes_cps:8.2f}")
    print(f"RESULT overhead_captures_per_s={cps:.0f} rows_per_s={rps:.0f} "
          f"write_vs_copy={writes.ratio:.2f}")


def _job_state(engine: Engine, job_id: int) -> str:
    with engine.connect() as conn:
        return conn.scalar(select(Job.state).where(Job.id == job_id)) or ""


def _job_times(engine: Engine, job_id: int):  # noqa: ANN202
    with engine.connect() as conn:
        return conn.execute(select(Job.started_at, Job.finished_at).where(Job.id == job_id)).one()


def _rows(engine: Engine, job_id: int) -> tuple[int, int]:
    """Detection rows and classification rows of the job."""
    with engine.connect() as conn:
        dets = conn.scalar(
            select(func.count()).select_from(Detection).where(Detection.job_id == job_id)
        ) or 0
        classes = conn.scalar(
            select(func.count())
            .select_from(Classification)
            .join(Detection, Detection.id == Classification.detection_id)
            .where(Detection.job_id == job_id)
        ) or 0
    return dets, classes


if __name__ == "__main__":
    main()
