"""Soak: does a real worker's memory stay flat over thousands of 4K captures?

A Celery worker subprocess on PostgreSQL and Redis (a temporary database and queue, both
removed afterwards) processes a job of --captures captures made by repeating the 4K JPEGs of
--images (default: 4096x2160 captures generated into a temporary folder). Each capture has its
own URI (`file:///...jpg?n=<i>`, the same bytes), imported from a CSV manifest with `trapq
import` and sent with `trapq enqueue`, as a user would. The worker's RSS (its whole process
tree) and, on CUDA, its GPU memory (torch.cuda's allocator, read in the worker and stored
with each chunk) are sampled every --every seconds.

    .venv/bin/python -m bench.soak --images ../shared/data/moth-trap-captures

Growth is measured from the end of the warm-up (--warmup captures) to the end of the job, each
end the median of three samples, so that one sample caught with a batch more or less in flight
does not count as growth. Goal: under 100 MB.

On a CPU the default detector is constant_boxes (no model cost: fetch and decode of 4K JPEGs,
crops and the database writes are what is soaked) keeping its top box only: its 20 boxes tile
the whole frame, and cutting a 4K frame into 20 crops with roi_align costs ~1.4 s on one core.
--detector NAME runs a real model instead (random weights unless --weights).

Environment: TRAPQ_TEST_PG_URL (an admin URL, default postgres@127.0.0.1/test) and
TRAPQ_TEST_REDIS_URL (default redis://127.0.0.1:6379/1), as the tests use.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # `python bench/soak.py` runs as `python -m bench.soak` would
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import contextlib
import csv
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psutil
import redis
from PIL import Image
from sqlalchemy import Engine, func, select

from db.models import Chunk, Job, JobCapture
from db.session import make_engine
from tasks.worker.supervisor import celery_argv
from tests.services import REDIS_URL, service_env, temporary_database, temporary_queue

UHD_WIDTH = 3840  # "4K": UHD (3840x2160) and DCI (4096x2160) captures both count
TABLE_ROWS = 30
ENDED = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class Sample:
    t: float
    captures: int  # work items ended (done or failed)
    rss_mb: float
    gpu_mb: float | None


def four_k_jpegs(folder: Path) -> list[Path]:
    found = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in (".jpg", ".jpeg"):
            continue
        with Image.open(path) as im:
            if im.width >= UHD_WIDTH:
                found.append(path)
    return found


def generated_captures(folder: Path, n: int) -> list[Path]:
    from synthetic.scenes import generate_night

    generate_night(folder, n, seed=8, size=(4096, 2160))
    return sorted(folder.glob("*.jpg"))


def write_manifest(path: Path, files: list[Path], n: int) -> None:
    """n rows over the files in turn; distinct URIs (a query the fetcher ignores), same bytes."""
    start = datetime(2024, 6, 1, 21, 0, tzinfo=UTC)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["uri", "captured_at"])
        for i in range(n):
            uri = f"{files[i % len(files)].resolve().as_uri()}?n={i}"
            out.writerow([uri, (start + timedelta(seconds=10 * i)).isoformat()])


def tree_rss_mb(proc: psutil.Process) -> float:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / 2**20


def gpu_mb(engine: Engine, job_id: int) -> float | None:
    """GPU memory the worker's caching allocator holds (reserved), as its latest finished chunk
    read it from torch.cuda inside the worker; None before a chunk has finished. nvidia-smi's
    per-process figures are keyed by host PIDs, which a container does not see."""
    with engine.connect() as conn:
        metrics = conn.scalar(
            select(Chunk.metrics)
            .where(Chunk.job_id == job_id, Chunk.finished_at.is_not(None))
            .order_by(Chunk.finished_at.desc())
            .limit(1)
        )
    if not metrics or metrics.get("gpu_reserved_mb") is None:
        return None
    return float(metrics["gpu_reserved_mb"])


def ended_items(engine: Engine, job_id: int) -> int:
    with engine.connect() as conn:
        return conn.scalar(
            select(func.count()).where(
                JobCapture.job_id == job_id, JobCapture.state.in_(("done", "failed"))
            )
        ) or 0


def job_state(engine: Engine, job_id: int) -> str:
    with engine.connect() as conn:
        return conn.scalar(select(Job.state).where(Job.id == job_id)) or ""


def cli(env: dict[str, str], *args: str) -> str:
    trapq = Path(sys.executable).with_name("trapq")  # the console script of this venv
    out = subprocess.run(
        [str(trapq), *args], env=env, capture_output=True, text=True, timeout=600
    )
    if out.returncode:
        raise SystemExit(f"trapq {' '.join(args)} failed:\n{out.stdout}{out.stderr}")
    return out.stdout.strip()


def wait_ready(proc: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if " ready." in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise SystemExit(f"worker exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    raise SystemExit(f"worker not ready after {timeout}s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def median_rss(samples: list[Sample]) -> float:
    return statistics.median(s.rss_mb for s in samples)


def print_table(samples: list[Sample], marks: dict[int, str]) -> None:
    """At most TABLE_ROWS rows, evenly spread, always with the marked ones."""
    step = max(1, len(samples) // TABLE_ROWS)
    shown = sorted({*range(0, len(samples), step), len(samples) - 1, *marks})
    has_gpu = any(s.gpu_mb is not None for s in samples)
    print(f"{'t_s':>7} {'captures':>9} {'rss_mb':>8}" + (f" {'gpu_mb':>8}" if has_gpu else ""))
    for i in shown:
        s = samples[i]
        gpu = f" {s.gpu_mb:8.0f}" if has_gpu and s.gpu_mb is not None else ""
        print(f"{s.t:7.0f} {s.captures:9d} {s.rss_mb:8.0f}{gpu}  {marks.get(i, '')}".rstrip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=Path, help="folder of 4K JPEGs to repeat (recursive)")
    ap.add_argument("--captures", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=500, help="captures before growth counts")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--detector", help="registry name; default constant_boxes (top box only)")
    ap.add_argument("--classifier", default="demo_classifier")
    ap.add_argument("--weights", action="store_true", help="the models' weights, not random")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--pool", default="threads")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--generate", type=int, default=8, help="distinct captures generated")
    ap.add_argument("--timeout-min", type=float, default=90)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="trapq-soak-"))
    try:
        if args.images:
            files = four_k_jpegs(args.images)
            if not files:
                raise SystemExit(f"no JPEGs {UHD_WIDTH} pixels wide or more under {args.images}")
        else:
            files = generated_captures(work / "captures", args.generate)
        print(f"{len(files)} distinct 4K JPEGs ({sum(f.stat().st_size for f in files) / 2**20:.0f}"
              f" MB) repeated to {args.captures} captures")
        write_manifest(work / "manifest.csv", files, args.captures)
        with temporary_database("trapq_soak") as url, temporary_queue("trapq-soak") as queue:
            run(args, url, queue, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def worker_env(args: argparse.Namespace, url: str, queue: str, work: Path) -> dict[str, str]:
    env = service_env(
        work / "data", url, REDIS_URL, queue,
        TRAPQ_DEVICE=args.device,
        TRAPQ_DETECTOR=args.detector or "constant_boxes",
        TRAPQ_CLASSIFIER=args.classifier,
        TRAPQ_RANDOM_WEIGHTS="false" if args.weights else "true",
    )
    # Soaked as deployed: torch picks its own thread count unless the caller's environment says.
    env.pop("OMP_NUM_THREADS")
    if "OMP_NUM_THREADS" in os.environ:
        env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
    if not args.detector:
        env["TRAPQ_BOX_THRESHOLD"] = "1.0"  # constant_boxes scores 1.0 down to 0.5: one box
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run(args: argparse.Namespace, url: str, queue: str, work: Path) -> None:
    env = worker_env(args, url, queue, work)
    log = work / "worker.log"
    argv = celery_argv(queue, f"soak-{uuid.uuid4().hex[:6]}@%h", pool=args.pool,
                       concurrency=args.concurrency)
    db = make_engine(url)
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    task_ids: list[str] = []
    try:
        wait_ready(proc, log)
        worker = psutil.Process(proc.pid)
        idle_mb = tree_rss_mb(worker)
        cli(env, "import", str(work / "manifest.csv"), "--deployment", "soak")
        job_id = int(cli(env, "enqueue", "soak", "--chunk-size", str(args.chunk_size)))
        samples = sample_until_done(args, worker, proc, db, job_id)
        state = job_state(db, job_id)
        with db.connect() as conn:
            rows = conn.execute(select(Chunk.task_id, Chunk.metrics).where(Chunk.job_id == job_id))
            chunks = rows.all()
        task_ids = [t for t, _ in chunks if t]
    finally:
        stop(proc)
        db.dispose()
        if task_ids:
            client = redis.Redis.from_url(REDIS_URL)
            client.delete(*(f"celery-task-meta-{t}" for t in task_ids))
            client.close()
    report(args, samples, idle_mb, state, [m for _, m in chunks if m])
    if proc.returncode not in (0, -signal.SIGTERM):
        print(f"worker exited {proc.returncode}; last lines of its log:\n"
              + "\n".join(log.read_text(errors="replace").splitlines()[-20:]))


def sample_until_done(
    args: argparse.Namespace, worker: psutil.Process, proc: subprocess.Popen[bytes],
    db: Engine, job_id: int,
) -> list[Sample]:
    samples: list[Sample] = []
    started = time.monotonic()
    deadline = started + 60 * args.timeout_min
    while True:
        done = ended_items(db, job_id)
        samples.append(Sample(time.monotonic() - started, done, tree_rss_mb(worker),
                              gpu_mb(db, job_id) if args.device != "cpu" else None))
        if job_state(db, job_id) in ENDED or proc.poll() is not None:
            return samples
        if time.monotonic() > deadline:
            print(f"timed out after {args.timeout_min} min with {done} captures ended")
            return samples
        time.sleep(args.every)


def report(
    args: argparse.Namespace, samples: list[Sample], idle_mb: float, state: str,
    metrics: list[dict[str, object]],
) -> None:
    captures = samples[-1].captures
    warm = next((i for i, s in enumerate(samples) if s.captures >= args.warmup), None)
    running = [s for s in samples if s.captures < captures] or samples
    end = running[-3:]
    marks = {samples.index(max(samples, key=lambda s: s.rss_mb)): "<- peak"}
    if warm is not None:
        marks[warm] = "<- warm-up over"
    print_table(samples, marks)
    elapsed = samples[-1].t or 1.0
    peak = max(s.rss_mb for s in samples)
    in_flight = max((int(m.get("images_in_flight_peak") or 0) for m in metrics), default=0)
    print(f"job {state}: {captures} captures in {elapsed:.0f} s = {captures / elapsed:.2f}/s; "
          f"worker RSS idle (models loaded) {idle_mb:.0f} MB, peak {peak:.0f} MB "
          f"(+{peak - idle_mb:.0f} MB working); images in flight peak {in_flight}")
    if warm is None or samples[warm] in end:
        print(f"RESULT rss_growth_mb=nan peak_rss_mb={peak:.0f} captures={captures}")
        return
    growth = median_rss(end) - median_rss(samples[warm : warm + 3])
    gpu = [s.gpu_mb for s in samples if s.gpu_mb is not None]
    if gpu:
        warm_gpu = gpu[min(warm, len(gpu) - 1)]
        print(f"GPU memory (torch.cuda reserved): warm-up end {warm_gpu:.0f} MB, "
              f"peak {max(gpu):.0f} MB, end {gpu[-1]:.0f} MB")
    print(f"RESULT rss_growth_mb={growth:.0f} peak_rss_mb={peak:.0f} captures={captures}")


if __name__ == "__main__":
    main()
