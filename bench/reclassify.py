"""Re-classification beside a full run, on the same captures, models and engine, in one run.

(a) full: fetch, decode, detector forward, crops, classifier; (b) re-classification: the same
images fetched and decoded, the boxes (a)'s, the detector skipped, crops and classifier only,
as a `trapq enqueue --reuse-detections-from JOB` job's workers run it. Prints wall time and
the engine's device-thread time of each, their ratios, and checks that (b) gave every box the
label (a) gave it (same classifier). Then (c) the same as jobs: a real worker (subprocess) on
PostgreSQL and Redis runs a full job and a re-classification job of it, each timed from its
first claim to its end, database writes included (--no-jobs skips it; fresh temporary
database and queue, removed after).

    python -m bench.reclassify --n 8
    python -m bench.reclassify --images /work/shared/data/moth-trap-captures --n 8
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # `python bench/reclassify.py` runs as `python -m bench.reclassify` would
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import tempfile
import time
from dataclasses import dataclass

import torch
from sqlalchemy import Engine as SqlEngine
from sqlalchemy import select

from db.imports import CaptureRow, get_or_create_deployment, insert_captures
from db.models import Job
from db.session import make_engine, make_sessionmaker
from inference.engine import Engine, EngineConfig
from inference.registry import load_pipeline, model_source
from inference.types import Detection, ItemResult, WorkItem
from synthetic.scenes import generate_night
from tasks.producer import enqueue
from tasks.settings import Settings
from tests.services import REDIS_URL, service_env, temporary_database, temporary_queue
from tests.worker_process import WorkerProcess, wait_for

SUFFIXES = {".jpg", ".jpeg", ".png"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=Path, help="folder of captures (default: a demo night)")
    p.add_argument("--n", type=int, default=8, help="captures")
    p.add_argument("--size", default="1920x1080", help="demo night's capture size, WxH")
    p.add_argument("--device", default="auto")
    p.add_argument("--detector", default="demo_detector")
    p.add_argument("--classifier", default="demo_classifier")
    p.add_argument("--box-threshold", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--decode-threads", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=1, help="repeat both measurements")
    p.add_argument("--jobs", action=argparse.BooleanOptionalAction, default=True,
                   help="also time a full and a re-classification job through a real worker")
    p.add_argument("--chunk-size", type=int, default=4)
    return p.parse_args()


@dataclass(frozen=True)
class Measured:
    wall_s: float
    device_s: float  # the engine thread's busy time: forwards, crops, classifiers
    results: list[ItemResult]

    @property
    def boxes(self) -> int:
        return sum(len(r.detections) for r in self.results)


def captures(args: argparse.Namespace, scratch: Path) -> list[Path]:
    if args.images is not None:
        found = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in SUFFIXES)
        if not found:
            raise SystemExit(f"no images under {args.images}")
        return (found * (1 + args.n // len(found)))[: args.n]
    w, h = (int(v) for v in args.size.split("x"))
    generate_night(scratch, n=args.n, seed=4242, size=(w, h))
    return sorted(scratch.glob("*.jpg"))


def measure(engine: Engine, items: list[WorkItem]) -> Measured:
    busy_before = engine.stats().busy_s
    t0 = time.perf_counter()
    results = list(engine.run(items))
    wall = time.perf_counter() - t0
    failed = [r for r in results if not r.ok]
    if failed:
        raise SystemExit(f"{len(failed)} captures failed, e.g. {failed[0].uri}: {failed[0].error}")
    busy = engine.stats().busy_s - busy_before
    return Measured(wall, busy, sorted(results, key=lambda r: r.key))


def with_boxes(full: Measured) -> list[WorkItem]:
    """The work items of a re-classification job: each capture with the full run's boxes."""
    items = []
    for r in full.results:
        given = tuple(
            Detection(d.x1, d.y1, d.x2, d.y2, d.score, d.label, source=r.key * 10_000 + i)
            for i, d in enumerate(r.detections)
        )
        items.append(WorkItem(r.key, r.uri, given))
    return items


def same_labels(full: Measured, again: Measured) -> float:
    pairs = [
        (a.classifications[-1].label, b.classifications[-1].label)
        for ra, rb in zip(full.results, again.results, strict=True)
        for a, b in zip(ra.detections, rb.detections, strict=True)
        if a.classifications and b.classifications
    ]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else 1.0


def time_jobs(args: argparse.Namespace, paths: list[Path]) -> tuple[float, float]:
    """(c) seconds of a full job and of a re-classification job of it, first claim to end."""
    with (
        temporary_database("trapq_bench") as url,
        temporary_queue("trapq-bench") as queue,
        tempfile.TemporaryDirectory(prefix="trapq-bench-") as tmp,
    ):
        env = service_env(
            Path(tmp) / "data", url, REDIS_URL, queue,
            TRAPQ_DETECTOR=args.detector,
            TRAPQ_CLASSIFIER=args.classifier,
            TRAPQ_BOX_THRESHOLD=str(args.box_threshold),
            TRAPQ_BATCH_SIZE=str(args.batch_size),
            TRAPQ_DECODE_THREADS=str(args.decode_threads),
            **({"TRAPQ_DEVICE": args.device} if args.device != "auto" else {}),
        )
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            **{k[6:].lower(): v for k, v in env.items() if k.startswith("TRAPQ_")},
        )
        engine = make_engine(url)
        with make_sessionmaker(engine).begin() as s:
            rows = [CaptureRow(uri=str(p), captured_at=None, width=None, height=None)
                    for p in paths]
            insert_captures(s, get_or_create_deployment(s, "bench"), rows)
        worker = WorkerProcess(env, Path(tmp) / "worker.log", concurrency=2)
        try:
            worker.start()
            run_job(engine, settings, worker, args.chunk_size, limit=1)  # warm-up
            full_id, full_s = run_job(engine, settings, worker, args.chunk_size)
            _, again_s = run_job(engine, settings, worker, args.chunk_size,
                                 reuse_detections_from=full_id)
        finally:
            worker.kill()
            engine.dispose()
    return full_s, again_s


def run_job(
    engine: SqlEngine, settings: Settings, worker: WorkerProcess, chunk_size: int,
    **options: int,
) -> tuple[int, float]:
    """Enqueue a job of the bench's captures, wait for its end: its id and seconds."""
    job_id = enqueue(settings, "bench", chunk_size=chunk_size, **options).job_id  # type: ignore[arg-type]
    assert job_id is not None

    def ended() -> bool:
        with engine.connect() as conn:
            return conn.scalar(select(Job.state).where(Job.id == job_id)) in ("done", "failed")

    wait_for(ended, 900, f"job {job_id}", every=0.1, on_timeout=worker.tail)
    with engine.connect() as conn:
        state, started, finished = conn.execute(
            select(Job.state, Job.started_at, Job.finished_at).where(Job.id == job_id)
        ).one()
    if state != "done":
        raise SystemExit(f"job {job_id} ended {state}:\n{worker.tail()}")
    return job_id, (finished - started).total_seconds()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="trapq-bench-") as tmp:
        paths = captures(args, Path(tmp))
        run(args, paths)


def run(args: argparse.Namespace, paths: list[Path]) -> None:
    pipeline = load_pipeline(
        model_source(args.detector, "detector"),
        model_source(args.classifier, "classifier"),
        device=args.device,
        box_threshold=args.box_threshold,
    )
    config = EngineConfig(batch_size=args.batch_size, decode_threads=args.decode_threads)
    with Engine(pipeline, config) as engine:
        plain = [WorkItem(i, str(p)) for i, p in enumerate(paths)]
        measure(engine, plain[:1])  # warm-up: first forwards allocate and pick kernels
        fulls, agains = [], []
        for _ in range(args.rounds):
            full = measure(engine, plain)
            fulls.append(full)
            agains.append(measure(engine, with_boxes(full)))
        full = min(fulls, key=lambda m: m.wall_s)
        again = min(agains, key=lambda m: m.wall_s)
    n = len(paths)
    agreement = same_labels(full, again)
    print(f"{n} captures, {full.boxes} boxes ({full.boxes / n:.1f} per capture), "
          f"{args.detector} + {args.classifier} on {pipeline.device}, best of {args.rounds}")
    print(f"{'run':<22}{'wall s':>9}{'img/s':>9}{'device s':>10}")
    for name, m in (("(a) full", full), ("(b) re-classification", again)):
        print(f"{name:<22}{m.wall_s:>9.2f}{n / m.wall_s:>9.2f}{m.device_s:>10.2f}")
    speedup = full.wall_s / again.wall_s
    device_speedup = full.device_s / again.device_s if again.device_s else float("inf")
    print(f"re-classification is {speedup:.1f}x faster end to end ({device_speedup:.1f}x on the "
          f"device thread); same top-1 label for {agreement:.1%} of the boxes", flush=True)
    jobs = ""
    if args.jobs:
        full_job_s, again_job_s = time_jobs(args, paths)
        job_speedup = full_job_s / again_job_s
        print(f"{'(c) full job':<22}{full_job_s:>9.2f}{n / full_job_s:>9.2f}")
        print(f"{'(c) re-class. job':<22}{again_job_s:>9.2f}{n / again_job_s:>9.2f}")
        print(f"as jobs through a real worker and PostgreSQL: {job_speedup:.1f}x faster")
        jobs = (f" job_speedup={job_speedup:.2f} full_job_s={full_job_s:.2f}"
                f" reclassify_job_s={again_job_s:.2f}")
    print(f"RESULT speedup={speedup:.2f} device_speedup={device_speedup:.2f} "
          f"full_s={full.wall_s:.2f} reclassify_s={again.wall_s:.2f}{jobs} captures={n} "
          f"boxes={full.boxes} same_label={agreement:.3f}")


if __name__ == "__main__":
    main()
