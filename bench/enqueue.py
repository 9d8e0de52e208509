"""Import 1,000,000 synthetic captures into PostgreSQL and enqueue them on Redis (chunk size 64).

Uses a fresh temporary database and queue, both removed afterwards. Prints the import rate,
the seconds to enqueue (job creation in SQL + one message per chunk) and the RSS of the
enqueue, run in a process of its own as `trapq enqueue` is: its RSS as it starts (imports
done), its peak while enqueueing (sampled), the difference, and whether torch was imported.
The pipeline (the settings' `default`) is recorded first, as `trapq pipelines add` or a
first enqueue would, so the enqueue itself only reads it.

    .venv/bin/python -m bench.enqueue [--rows N] [--chunk-size N]

Environment: TRAPQ_TEST_PG_URL (an admin URL, default postgres@127.0.0.1/test) and
TRAPQ_TEST_REDIS_URL (default redis://127.0.0.1:6379/1), as the tests use.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # `python bench/enqueue.py` runs as `python -m bench.enqueue` would
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
import os
import resource
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import psutil
import redis
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

import tasks.producer as producer
from db.imports import CaptureRow, get_or_create_deployment, insert_captures
from db.session import make_engine, make_sessionmaker
from tasks.pipeline import resolve_pipeline
from tasks.settings import Settings
from tests.services import PG_ADMIN_URL, REDIS_URL, temporary_database, temporary_queue


def synthetic_rows(n: int) -> Iterator[CaptureRow]:
    start = datetime(2024, 6, 1, 21, 0, tzinfo=UTC)
    for i in range(n):
        yield CaptureRow(
            uri=f"s3://bench-bucket/trap-01/{i // 10_000:04d}/{i:08d}.jpg",
            captured_at=start + timedelta(seconds=10 * i),
            width=4096,
            height=2160,
        )


class RssSampler(threading.Thread):
    """Peak resident memory of this process while it runs, sampled every 50 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def postgres_cpu_seconds(admin: Engine, database: str) -> float:
    """CPU time of the PostgreSQL backends serving the database (the server is local)."""
    with admin.connect() as conn:
        pids = conn.execute(
            text("SELECT pid FROM pg_stat_activity WHERE datname = :d"), {"d": database}
        ).scalars()
        total = 0.0
        for pid in pids:
            try:
                times = psutil.Process(pid).cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
    return total


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--enqueue-only", nargs=2, metavar=("DATABASE_URL", "QUEUE"),
                    help=argparse.SUPPRESS)  # the child process that enqueues
    args = ap.parse_args()
    if args.enqueue_only:
        enqueue_in_this_process(*args.enqueue_only, args.chunk_size)
        return

    r = redis.Redis.from_url(REDIS_URL)
    try:
        with temporary_database("trapq_bench") as url, temporary_queue("trapq-bench") as queue:
            run(args, r, url, queue)
    finally:
        r.close()


def run(args: argparse.Namespace, r: redis.Redis, url: str, queue: str) -> None:
    """Import, then enqueue in a process of its own."""
    settings = Settings(
        database_url=url, broker_url=REDIS_URL, result_backend=REDIS_URL, queue=queue
    )

    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    t0 = time.perf_counter()
    with factory.begin() as session:
        deployment_id = get_or_create_deployment(session, "bench")
        counts = insert_captures(session, deployment_id, synthetic_rows(args.rows))
    import_s = time.perf_counter() - t0
    import_rate = counts.added / import_s
    print(f"import: {counts.added} rows in {import_s:.1f} s = {import_rate:,.0f} rows/s")
    engine.dispose()

    with factory() as session:  # planner statistics, as autovacuum would after an import
        session.execute(text("ANALYZE captures"))
        session.commit()

    resolve_pipeline(settings, factory, None)  # recorded here, read by the enqueue
    child = subprocess.run(
        [sys.executable, "-m", "bench.enqueue", "--chunk-size", str(args.chunk_size),
         "--enqueue-only", url, queue],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
    )
    m = json.loads(child.stdout.strip().splitlines()[-1])
    result = producer.EnqueueResult(**m["result"])
    enqueue_s, plan_s, own_cpu, pg_cpu = m["enqueue_s"], m["plan_s"], m["cpu_s"], m["pg_cpu_s"]
    send_s = enqueue_s - plan_s
    on_queue = r.llen(queue)
    print(
        f"enqueue: job {result.job_id}, {result.n_captures} captures, {result.n_chunks} chunks "
        f"of {args.chunk_size}: {enqueue_s:.1f} s (plan in SQL {plan_s:.1f} s, "
        f"send {send_s:.1f} s = {result.sent / send_s:,.0f} messages/s); "
        f"{on_queue} messages on Redis, {result.failed} failed"
    )
    steps = m["send_steps"]
    publish_s = send_s - sum(steps.values())
    print("send: " + ", ".join(f"{name} {t:.1f} s" for name, t in steps.items())
          + f", publishing (and the rest) {publish_s:.1f} s")
    print(
        f"cpu: {own_cpu:.1f} s in the enqueue process, {pg_cpu:.1f} s in its PostgreSQL backends; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
        "(other work on the machine stretches the wall time, not these)"
    )
    over_start = m["peak_rss"] - m["start_rss"]
    print(
        f"rss of the enqueue process: {mib(m['start_rss'])} as it starts (imports done), "
        f"{mib(m['peak_rss'])} peak while enqueueing: +{mib(over_start)} over its start "
        f"(goal <= 150 MiB); torch imported: {m['torch']}"
    )
    if on_queue != result.n_chunks or result.failed:
        raise SystemExit("bench: messages on the queue do not match the chunks")
    print(f"RESULT enqueue_1m_s={enqueue_s:.1f} import_rows_per_s={import_rate:.0f} "
          f"enqueue_rss_over_start_mib={over_start / 2**20:.0f} torch={m['torch']} "
          f"load1={os.getloadavg()[0]:.1f}")


def enqueue_in_this_process(url: str, queue: str, chunk_size: int) -> None:
    """The child: enqueue the deployment `bench`, print one JSON line of what it measured
    (the CPU of its PostgreSQL backends too, read while they still exist)."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = make_url(url).database or ""
    settings = Settings(
        database_url=url, broker_url=REDIS_URL, result_backend=REDIS_URL, queue=queue
    )
    send_started: list[float] = []
    send_chunks = producer.send_chunks

    def timed_send(*a, **kw):  # type: ignore[no-untyped-def]
        send_started.append(time.perf_counter())
        return send_chunks(*a, **kw)

    producer.send_chunks = timed_send  # type: ignore[assignment]
    # The send's steps in SQL (the task-id fence: record before, confirm after each batch);
    # the rest of the send is publishing.
    steps = {name: 0.0 for name in SEND_STEPS}
    for name in SEND_STEPS:
        setattr(producer, name, _timed(getattr(producer, name), steps, name))
    sampler = RssSampler()
    start_rss = sampler.peak
    sampler.start()
    cpu_before = cpu_seconds(), postgres_cpu_seconds(admin, name)
    t0 = time.perf_counter()
    result = producer.enqueue(settings, "bench", chunk_size=chunk_size)
    enqueue_s = time.perf_counter() - t0
    pg_cpu = postgres_cpu_seconds(admin, name) - cpu_before[1]
    admin.dispose()
    sampler.stop.set()
    sampler.join()
    # Sampled, not ru_maxrss: after fork and exec that still counts the parent's image.
    peak = sampler.peak
    print(json.dumps({
        "result": result.__dict__, "enqueue_s": enqueue_s,
        "plan_s": (send_started[0] if send_started else time.perf_counter()) - t0,
        "cpu_s": cpu_seconds() - cpu_before[0], "pg_cpu_s": pg_cpu, "start_rss": start_rss,
        "peak_rss": peak,
        "torch": "torch" in sys.modules,
        "send_steps": steps,
    }))


SEND_STEPS = ("assign_task_ids", "chunk_places", "confirm_sent")


def _timed(
    f: Callable[..., object], into: dict[str, float], name: str
) -> Callable[..., object]:
    def timed(*a: object, **kw: object) -> object:
        t0 = time.perf_counter()
        try:
            return f(*a, **kw)
        finally:
            into[name] += time.perf_counter() - t0
    return timed


if __name__ == "__main__":
    main()
