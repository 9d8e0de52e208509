"""The overhead ceiling of the worker: everything that is not the model.

A real Celery worker (subprocess, threads pool) on Redis and PostgreSQL processes a job of
tiny JPEGs with zero-cost models: the `constant_boxes` detector (20 boxes per image) and the
`constant_classifier` (constant logits, 8 px crops, top-5). Their tensor work is negligible on
a CPU too, so what is left is what a GPU host pays: fetch, decode, Celery, claims, result
assembly and the database writes. Side by side in one run it measures:

  (a) the engine alone, in this process, over the same files (no queue, no database);
  (b) the database writes alone: write_results of the same number of captures x 20 boxes,
      beside a raw COPY of the same rows (bench.writes);
  (c) the real worker end to end, from the first claim to the job's end;
  (d) 2 and 4 worker processes on one job against the same database (--workers): how many
      GPU hosts one PostgreSQL serves.

and prints (c) against (a) and (b), with the load average (the machine may be shared). Uses a
fresh temporary database and queue, removed after.

    .venv/bin/python -m bench.worker [--images 2000] [--chunk-size 200] [--concurrency 2]
                                     [--pool threads|prefork|solo] [--workers 1,2,4]

Environment: TRAPQ_TEST_PG_URL and TRAPQ_TEST_REDIS_URL, as the tests use.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # `python bench/worker.py` runs as `python -m bench.worker` would
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import gc
import os
import tempfile
import time

import psutil
import torch
from sqlalchemy import Engine, func, select

from bench.writes import bench_writes, print_figures
from db.models import Classification, Detection, Job
from db.session import make_engine
from inference.engine import Engine as InferenceEngine
from inference.types import WorkItem
from tasks.settings import Settings
from tasks.worker.boot import engine_config, load_models
from tests.services import REDIS_URL, service_env, temporary_database, temporary_queue
from tests.worker_jobs import env_pipeline, item_states, make_job, send, write_jpegs
from tests.worker_process import WorkerProcess, wait_for

BOXES = 20
TOP_K = 5


def bench_engine(settings: Settings, paths: list[Path]) -> tuple[float, float]:
    """(a) images/s of the engine alone over the files, and its CPU µs per image. Results
    are checked as they come and dropped, as the worker drops them once written."""
    pipeline = load_models(settings.model_copy(update={"device": "cpu"}))
    engine = InferenceEngine(pipeline, engine_config(settings))
    engine.start()
    gc.freeze()  # as tasks.worker.boot does once the models are loaded
    checked = 0
    try:
        t0, cpu0 = time.perf_counter(), time.process_time()
        for r in engine.run(WorkItem(i, str(p)) for i, p in enumerate(paths)):
            assert r.ok and len(r.detections) == BOXES, r
            assert len(r.detections[0].classifications[0].topk) == TOP_K
            checked += 1
        elapsed, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        engine.close()
    assert checked == len(paths)
    return len(paths) / elapsed, 1e6 * cpu_s / len(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--chunk-size", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--pool", choices=["threads", "prefork", "solo"], default="threads")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--height", type=int, default=24)
    parser.add_argument("--workers", default="1,2,4", help="worker processes per run, in turn")
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
    env = service_env(
        folder / "data", url, REDIS_URL, queue,
        TRAPQ_DETECTOR="constant_boxes",
        TRAPQ_CLASSIFIER="constant_classifier",
        TRAPQ_BATCH_SIZE="32",
        TRAPQ_MAX_IMAGES_IN_FLIGHT="64",
        TRAPQ_FETCH_THREADS="4",
        TRAPQ_DECODE_THREADS="2",
        TRAPQ_TOP_K=str(TOP_K),
    )
    print(f"load average at start: {_load()}", flush=True)
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        **{k[6:].lower(): v for k, v in env.items() if k.startswith("TRAPQ_")},
    )
    engine_ips, engine_cpu_us = bench_engine(settings, paths)
    print(f"(a) engine alone:        {engine_ips:8.0f} captures/s "
          f"(CPU {engine_cpu_us:.0f} µs/capture)", flush=True)
    writes = bench_writes(engine, [str(p) for p in paths], settings.write_batch_size)
    print_figures(writes)
    writes_cps = writes.captures / writes.write_s

    per_workers: dict[int, float] = {}
    rps = 0.0
    try:
        for n in [int(w) for w in args.workers.split(",")]:
            cps, rows, class_rows, wall, cpu_us = end_to_end(args, env, engine, paths, folder, n)
            per_workers[n] = cps
            rps = rps or rows / wall
            label = "(c) worker end to end:" if n == 1 else f"(d) {n} worker processes:"
            print(f"{label:24s} {cps:8.0f} captures/s ({rows / wall:.0f} detection rows/s "
                  f"+ as many classification rows; {rows} + {class_rows} rows in {wall:.2f}s, "
                  f"chunk size {args.chunk_size}, {args.pool} x {args.concurrency} each; "
                  f"worker CPU {cpu_us:.0f} µs/capture; load {_load()})", flush=True)
    finally:
        engine.dispose()
    one = per_workers.get(1) or next(iter(per_workers.values()))
    print(f"worker / engine alone:   {one / engine_ips:8.2f}")
    print(f"worker / writes alone:   {one / writes_cps:8.2f}")
    scaling = " ".join(f"captures_per_s_{n}w={c:.0f}" for n, c in per_workers.items())
    print(f"RESULT overhead_captures_per_s={one:.0f} rows_per_s={rps:.0f} "
          f"write_vs_copy={writes.ratio:.2f} {scaling} load1={os.getloadavg()[0]:.2f}")


def end_to_end(
    args: argparse.Namespace,
    env: dict[str, str],
    engine: Engine,
    paths: list[Path],
    folder: Path,
    n_workers: int,
) -> tuple[float, int, int, float, float]:
    """A fresh job over the captures, run by n worker processes: captures/s, detection and
    classification rows, the job's wall time from its first claim to its end, and the
    workers' CPU µs per capture."""
    job = make_job(engine, [str(p) for p in paths], chunk_size=args.chunk_size,
                   deployment=f"end-to-end-{n_workers}", spec=env_pipeline(env))
    workers = [
        WorkerProcess(env, folder / f"worker{n_workers}-{i}.log", pool=args.pool,
                      concurrency=args.concurrency)
        for i in range(n_workers)
    ]
    try:
        for worker in workers:
            worker.start()
        cpu0 = _cpu_s(workers)
        send(env, engine, job.chunk_ids)
        wait_for(lambda: _job_state(engine, job.job_id) in ("done", "failed"), 900,
                 "the job", every=0.2, on_timeout=workers[0].tail)
        cpu_s = _cpu_s(workers) - cpu0
        states = item_states(engine, job.job_id)
        if states != {"done": len(paths)}:
            tails = "\n".join(w.tail(20) for w in workers)
            raise RuntimeError(f"{n_workers} workers left the job's captures {states}:\n{tails}")
        started, finished = _job_times(engine, job.job_id)
        rows, class_rows = _rows(engine, job.job_id)
        for worker in workers:
            worker.stop()
    finally:
        for worker in workers:
            worker.kill()
    wall = (finished - started).total_seconds()
    return len(paths) / wall, rows, class_rows, wall, 1e6 * cpu_s / len(paths)


def _cpu_s(workers: list[WorkerProcess]) -> float:
    """CPU seconds the worker processes (and any pool children) have used: a figure the
    machine's other load disturbs far less than wall time."""
    total = 0.0
    for worker in workers:
        proc = psutil.Process(worker.pid)
        for p in [proc, *proc.children(recursive=True)]:
            times = p.cpu_times()
            total += times.user + times.system
    return total


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


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
