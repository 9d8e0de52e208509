"""Fair share of the pool: the dispatcher against first come, first served, side by side.

Real PostgreSQL and Redis, two worker processes (one slot each) with zero-cost models
(`constant_boxes`, `constant_classifier`, as bench/worker.py), tiny JPEGs; scaled to minutes
on two cores. Measured in one run:

  (a) project A enqueues a job 20x the size of the others; once it runs, projects B-F enqueue
      one small job each (equal weights). Each small job's completion time against its ideal
      under the weighted share (6 projects busy: each gets 1/6 of the pool's measured chunk
      rate, so a small job of n chunks needs 6 n / rate), against FIFO as before the
      dispatcher (all chunks sent at once, A's first), and the total throughput against
      FIFO's: chunks from the first chunk's start to the last one's end, and (with_start)
      from the moment the run starts, which adds the dispatcher's start-up (its first ask of
      who consumes what waits out a 1 s broadcast, which FIFO's send finds answered);
  (b) two busy projects weighted 3:1: the split of chunk seconds while both had work;
  (c) the slots' idle fraction while chunks waited (sampled every 20 ms in (a)), fair and
      FIFO, split by whether a chunk's message was on the broker at the time: idle with one
      there is the worker's own gap between two chunks (ack, next message, claim), the same in
      both; idle with none there is the dispatcher's, its window run dry or a release not yet
      published;
  (d) `classify_images` of one image, 20 times, while a backlog runs: p50 and p95 latency
      against the batch time (a backlog chunk's mean wall time), and against FIFO's wait
      behind the backlog (the chunks queued ahead over the chunk rate: estimated, not run).

    .venv/bin/python -m bench.fairness [--chunks 8] [--chunk-size 8] [--tries 20]
                                       [--depth-rounds N]

--depth-rounds 0 runs the dispatcher with the window of 2 x live slots alone, as before its
depth (tasks.dispatcher.DEPTH_ROUNDS) was added: run both for a side-by-side figure.

Environment: TRAPQ_TEST_PG_URL and TRAPQ_TEST_REDIS_URL, as the tests use.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # `python bench/fairness.py` runs as `python -m bench.fairness` would
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy import Engine, text

import tasks.dispatcher
from db.imports import get_or_create_deployment
from db.projects import add_project, set_deployment_project
from db.session import make_engine, make_sessionmaker
from tasks.dispatcher import Dispatcher, run_in_thread
from tasks.fast_lane import classify_images
from tasks.pipeline import resolve_pipeline
from tasks.producer import send_chunks
from tasks.settings import Settings
from tasks.store import ready_session_factory
from tests.services import REDIS_URL, service_env, temporary_database, temporary_queue
from tests.worker_jobs import env_pipeline, make_job, write_jpegs
from tests.worker_process import WorkerProcess, wait_for

WORKERS = 2
SMALL = "BCDEF"
# A fast-lane answer's steps, from the call: images recorded and the job planned; the
# dispatcher wakes and records the chunk; its message published; a worker takes it (after the
# chunk it runs); the chunk runs; the caller, polling, sees the job ended.
LANE_STEPS = ("plan", "release", "publish", "to a worker", "run", "noticed")


def load1() -> str:
    return f"{os.getloadavg()[0]:.2f}"


class Lab:
    def __init__(self, url: str, env: dict[str, str], folder: Path, chunk_size: int) -> None:
        self.engine: Engine = make_engine(url)
        self.env = env
        self.folder = folder
        self.chunk_size = chunk_size
        self.settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            **{k[6:].lower(): v for k, v in env.items() if k.startswith("TRAPQ_")},
        )
        self.spec = env_pipeline(env)  # the workers' zero-cost models
        self.n = 0

    def job(self, project: str, n_chunks: int, weight: float = 1.0) -> int:
        """A new job of n_chunks chunks over new images, in `project`."""
        self.n += 1
        name = f"{project}-{self.n}"
        with make_sessionmaker(self.engine).begin() as s:
            add_project(s, project, weight, None)
            get_or_create_deployment(s, name)
            set_deployment_project(s, name, project)
        paths = write_jpegs(self.folder / name, n_chunks * self.chunk_size, 32, 24)
        return make_job(self.engine, [p.as_uri() for p in paths], chunk_size=self.chunk_size,
                        deployment=name, spec=self.spec).job_id

    def scalar(self, sql: str, **params: object) -> object:
        with self.engine.connect() as conn:
            return conn.scalar(text(sql), params)

    def ended(self, job_id: int) -> bool:
        return self.scalar("SELECT state FROM jobs WHERE id = :j", j=job_id) in ("done", "failed")

    def job_span(self, job_id: int, since: datetime) -> float:
        """Seconds from `since` to the job's end."""
        finished = self.scalar("SELECT finished_at FROM jobs WHERE id = :j", j=job_id)
        return (finished - since).total_seconds()  # type: ignore[operator]

    def now(self) -> datetime:
        return self.scalar("SELECT now()")  # type: ignore[return-value]

    def chunk_rate(self, jobs: list[int]) -> tuple[float, float]:
        """(chunks per second over the jobs' span, mean chunk wall seconds)."""
        first, last, n, wall = self._one(
            "SELECT min(started_at), max(finished_at), count(*), "
            "avg(extract(epoch FROM finished_at - started_at)) FROM chunks "
            "WHERE job_id = ANY(:jobs)", jobs=jobs)
        return n / (last - first).total_seconds(), float(wall)

    def lane_steps(self, job_id: int, asked: datetime, answered: datetime) -> tuple[float, ...]:
        """Seconds of each of LANE_STEPS for a fast-lane job of one chunk."""
        created, released, queued, started, finished = self._one(
            "SELECT j.created_at, c.released_at, c.queued_at, c.started_at, c.finished_at "
            "FROM jobs j JOIN chunks c ON c.job_id = j.id WHERE j.id = :j", j=job_id)
        marks = [asked, created, released, queued, started, finished, answered]
        return tuple((b - a).total_seconds() for a, b in zip(marks, marks[1:], strict=False))

    def _one(self, sql: str, **params: object) -> tuple:  # type: ignore[type-arg]
        with self.engine.connect() as conn:
            return tuple(conn.execute(text(sql), params).one())


@contextmanager
def dispatching(lab: Lab) -> Iterator[Dispatcher]:
    dispatcher, thread = run_in_thread(lab.settings)
    try:
        yield dispatcher
    finally:
        dispatcher.stop.set()
        thread.join(30)


def sample_idle(lab: Lab, stop: threading.Event, out: list[tuple[float, bool]]) -> None:
    """(idle slots / slots, whether a chunk's message was on the broker), sampled while any
    chunk waits pending or queued (a chunk recorded but not yet published is not on it)."""
    while not stop.is_set():
        running, pending, queued = lab._one(
            "SELECT count(*) FILTER (WHERE state = 'running'), "
            "count(*) FILTER (WHERE state = 'pending' OR state = 'queued' AND queued_at IS NULL), "
            "count(*) FILTER (WHERE state = 'queued' AND queued_at IS NOT NULL) FROM chunks")
        if pending or queued:
            out.append((max(0, WORKERS - running) / WORKERS, bool(queued)))
        stop.wait(0.02)


def idle_split(samples: list[tuple[float, bool]]) -> tuple[float, float, float]:
    """(idle fraction, of it with a message on the broker, of it with none)."""
    n = len(samples) or 1
    gap = sum(idle for idle, queued in samples if queued) / n
    dry = sum(idle for idle, queued in samples if not queued) / n
    return gap + dry, gap, dry


def small_after_large(
    lab: Lab, n: int, fair: bool, idle: list[tuple[float, bool]]
) -> dict[str, float]:
    """(a): the large job, then five small ones once it runs; their completion times."""
    large = lab.job("A", 20 * n)
    stop = threading.Event()
    sampler = threading.Thread(target=sample_idle, args=(lab, stop, idle))
    window = 0
    with dispatching(lab) if fair else _nothing() as dispatcher:
        start = lab.now()
        if not fair:
            send_all(lab, [large])
        wait_for(lambda: lab.scalar("SELECT count(*) FROM chunks WHERE job_id = :j "
                                    "AND state = 'done'", j=large), 300, "the large job")
        sampler.start()  # once running: the dispatcher's start-up is not a steady-state gap
        smalls = [lab.job(p, n) for p in SMALL]
        enqueued = lab.now()
        if not fair:
            send_all(lab, smalls)
        wait_for(lambda: all(lab.ended(j) for j in [large, *smalls]), 900, "every job",
                 every=0.1)
        stop.set()
        sampler.join()
        if dispatcher is not None:
            window = dispatcher.window  # as deep as it grew (the rate spans the last 10 s)
            print(f"    dispatcher: window {window} for {dispatcher.slots} slots, "
                  f"round {dispatcher.round_s * 1000:.0f} ms, {dispatcher.rate:.1f} chunks/s "
                  f"released", flush=True)
    rate, wall = lab.chunk_rate([large, *smalls])
    makespan = max(lab.job_span(j, start) for j in [large, *smalls])
    return {
        "small_s": statistics.mean(lab.job_span(j, enqueued) for j in smalls),
        "small_max_s": max(lab.job_span(j, enqueued) for j in smalls),
        "ideal_s": (1 + len(SMALL)) * n / rate,
        "throughput": rate,  # first chunk start to last end: what the pool did while running
        "with_start": (20 + len(SMALL)) * n / makespan,  # from the start, start-up included
        "chunk_s": wall,
        "window": window,
    }


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def send_all(lab: Lab, jobs: list[int]) -> None:
    """FIFO as before the dispatcher: every chunk of the jobs sent at once, in order."""
    with lab.engine.connect() as conn:
        ids = list(conn.scalars(text(
            "SELECT id FROM chunks WHERE job_id = ANY(:jobs) ORDER BY job_id, seq"
        ), {"jobs": jobs}))
    send_chunks(lab.settings, make_sessionmaker(lab.engine), ids)


def weighted_split(lab: Lab, n: int) -> float:
    """(b): chunk seconds of a weight-3 project over a weight-1 one, while both had work:
    both jobs are planned before the dispatcher starts (planning one takes seconds here,
    which the first would otherwise have had to itself)."""
    heavy, light = lab.job("heavy", 20 * n, weight=3), lab.job("light", 20 * n, weight=1)
    with dispatching(lab):
        wait_for(lambda: lab.ended(heavy) or lab.ended(light), 900, "a project to run dry",
                 every=0.1)
        first_end = lab.scalar("SELECT min(finished_at) FROM jobs WHERE id IN (:h, :l)",
                               h=heavy, l=light)
        seconds = {
            job: float(lab.scalar(
                "SELECT coalesce(sum(extract(epoch FROM finished_at - started_at)), 0) "
                "FROM chunks WHERE job_id = :j AND finished_at <= :t", j=job, t=first_end)
                or 0.0)
            for job in (heavy, light)
        }
        wait_for(lambda: lab.ended(heavy) and lab.ended(light), 900, "both projects")
    return seconds[heavy] / seconds[light]


def classify_latency(lab: Lab, n: int, tries: int) -> dict[str, float]:
    """(d): one image through the fast lane, again and again, while a backlog runs."""
    (image,) = write_jpegs(lab.folder / "ask", 1, 32, 24)
    # The first use records the settings' pipeline (importing torch once, ~20 s here), as
    # the first `trapq enqueue` would: a cost of setting up, not of the lane.
    resolve_pipeline(lab.settings, ready_session_factory(lab.settings), None)
    backlog = lab.job("backlog", 40 * n)
    latencies: list[float] = []
    steps: list[tuple[float, ...]] = []
    ahead: list[int] = []
    with dispatching(lab):
        wait_for(lambda: lab.scalar("SELECT count(*) FROM chunks WHERE job_id = :j "
                                    "AND state = 'done'", j=backlog), 300, "the backlog")
        for _ in range(tries):
            if lab.ended(backlog):
                break
            ahead.append(int(lab.scalar("SELECT count(*) FROM chunks WHERE job_id = :j AND "
                                        "state IN ('pending', 'queued')", j=backlog) or 0))
            t0, asked = time.perf_counter(), lab.now()
            result = classify_images(lab.settings, [str(image)], wait=True, timeout_s=300)
            latencies.append(time.perf_counter() - t0)
            assert result.images[0].state == "done", result
            assert result.job_id is not None
            steps.append(lab.lane_steps(result.job_id, asked, lab.now()))
        wait_for(lambda: lab.ended(backlog), 900, "the backlog")
    rate, wall = lab.chunk_rate([backlog])
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19
    print("    latencies (s): " + " ".join(f"{t:.2f}" for t in latencies), flush=True)
    print("    where it went, median/max ms: " + ", ".join(
        f"{name} {statistics.median(step[k] for step in steps) * 1000:.0f}/"
        f"{max(step[k] for step in steps) * 1000:.0f}"
        for k, name in enumerate(LANE_STEPS)), flush=True)
    return {"p50": statistics.median(latencies), "p95": q[18], "batch_s": wall,
            "fifo_wait_s": statistics.mean(ahead) / rate, "tries": len(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=6, help="chunks of a small job")
    parser.add_argument("--chunk-size", type=int, default=24)
    parser.add_argument("--tries", type=int, default=20)
    parser.add_argument("--depth-rounds", type=int, default=tasks.dispatcher.DEPTH_ROUNDS,
                        help="rounds of release rate the window adds (0: 2 x slots alone)")
    args = parser.parse_args()
    tasks.dispatcher.DEPTH_ROUNDS = args.depth_rounds
    with (
        temporary_database("trapq_bench") as url,
        temporary_queue("trapq-bench") as queue,
        tempfile.TemporaryDirectory(prefix="trapq-fair-") as tmp,
    ):
        env = service_env(
            Path(tmp) / "data", url, REDIS_URL, queue,
            TRAPQ_DETECTOR="constant_boxes", TRAPQ_CLASSIFIER="constant_classifier",
            TRAPQ_BATCH_SIZE="8", TRAPQ_FETCH_THREADS="2", TRAPQ_DECODE_THREADS="1",
            TRAPQ_HEARTBEAT_S="1",
            TRAPQ_TRACK_AFTER_JOB="false",
        )
        lab = Lab(url, env, Path(tmp), args.chunk_size)
        workers = [WorkerProcess(env, Path(tmp) / f"worker-{i}.log", concurrency=1)
                   for i in range(WORKERS)]
        try:
            for w in workers:
                w.start()
            run(lab, args)
        finally:
            for w in workers:
                w.kill()
            lab.engine.dispose()


def run(lab: Lab, args: argparse.Namespace) -> None:
    n = args.chunks
    print(f"load average at start: {load1()}; {WORKERS} workers x 1 slot, chunks of "
          f"{args.chunk_size} images, small jobs of {n} chunks, the large one {20 * n}; "
          f"window depth {args.depth_rounds} rounds",
          flush=True)
    idle: list[tuple[float, bool]] = []
    fair = small_after_large(lab, n, fair=True, idle=idle)
    print(f"(a) fair: small jobs done {fair['small_s']:.1f} s after enqueue (slowest "
          f"{fair['small_max_s']:.1f} s), ideal {fair['ideal_s']:.1f} s: "
          f"{fair['small_max_s'] / fair['ideal_s']:.2f}x; {fair['throughput']:.2f} chunks/s "
          f"({fair['with_start']:.2f} with the start); "
          f"load1 {load1()}", flush=True)
    idle_fifo: list[tuple[float, bool]] = []
    fifo = small_after_large(lab, n, fair=False, idle=idle_fifo)
    print(f"(a) FIFO: small jobs done {fifo['small_s']:.1f} s after enqueue; "
          f"{fifo['throughput']:.2f} chunks/s ({fifo['with_start']:.2f} with the start); "
          f"load1 {load1()}", flush=True)
    split = weighted_split(lab, n)
    print(f"(b) weights 3:1: chunk seconds split {split:.2f}:1; load1 {load1()}", flush=True)
    idle_fraction, gap, dry = idle_split(idle)
    fifo_idle, fifo_gap, _ = idle_split(idle_fifo)
    print(f"(c) idle slots while chunks waited: {idle_fraction:.1%} of {len(idle)} samples: "
          f"{gap:.1%} with a message on the broker (the worker's own gap), {dry:.1%} with none "
          f"(the dispatcher's; window {fair['window']:.0f}); FIFO {fifo_idle:.1%} "
          f"({fifo_gap:.1%} with one on the broker); load1 {load1()}", flush=True)
    lat = classify_latency(lab, n, args.tries)
    print(f"(d) classify x{lat['tries']}: p50 {lat['p50']:.2f} s, p95 {lat['p95']:.2f} s; "
          f"batch time {lat['batch_s']:.2f} s (p95 = {lat['p95'] / lat['batch_s']:.1f} batch "
          f"times); FIFO behind the backlog ~{lat['fifo_wait_s']:.1f} s (estimated); "
          f"load1 {load1()}", flush=True)
    print(
        f"RESULT small_vs_ideal={fair['small_max_s'] / fair['ideal_s']:.2f} "
        f"fifo_vs_fair={fifo['small_s'] / fair['small_s']:.1f} "
        f"throughput_vs_fifo={fair['throughput'] / fifo['throughput']:.2f} "
        f"with_start_vs_fifo={fair['with_start'] / fifo['with_start']:.2f} "
        f"split_3_to_1={split:.2f} idle_fraction={idle_fraction:.3f} "
        f"idle_window_dry={dry:.3f} fifo_idle_fraction={fifo_idle:.3f} "
        f"classify_p50_s={lat['p50']:.2f} classify_p95_s={lat['p95']:.2f} "
        f"p95_batch_times={lat['p95'] / lat['batch_s']:.1f} "
        f"fifo_classify_wait_s={lat['fifo_wait_s']:.1f} load1={load1()}"
    )


if __name__ == "__main__":
    main()
