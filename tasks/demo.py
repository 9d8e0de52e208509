"""`trapq demo`: one night of synthetic captures through the whole path, on a real worker.

Generate -> import -> enqueue -> dispatcher (a thread here) -> a real Celery worker subprocess
-> job store -> summary, annotated images and a CSV export. On the embedded defaults (SQLite
job store, Kombu's SQLAlchemy transport) nothing needs a server; with
TRAPQ_DATABASE_URL/TRAPQ_BROKER_URL set it runs the same against PostgreSQL and Redis.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps
from sqlalchemy import select

from db.boxes import DetectionRecord
from db.models import Job
from db.occurrences import occurrence_counts
from db.states import ItemState
from db.status import JobStatus, job_status
from db.summary import answer_counts, boxes_of, busiest_captures
from db.taxa import set_taxa_list
from synthetic.nights import NightBehaviour, generate_tracked_night
from tasks.dispatcher import run_in_thread
from tasks.errors import UserError
from tasks.exports.table import write_csv
from tasks.importer import import_source
from tasks.producer import enqueue
from tasks.settings import Settings
from tasks.store import ready_session_factory
from tasks.tracking import track_job
from tasks.worker.supervisor import celery_argv

WORKER_STOP_S = 60.0
TRACKING_WAIT_S = 60.0


@dataclass
class DemoReport:
    job_id: int
    captures: int
    done: int
    failed: int
    seconds: float
    kinds: dict[str, int] = field(default_factory=dict)  # detections by answer
    ranks: dict[str, str] = field(default_factory=dict)  # each answer's rank (a taxonomy's)
    occurrences: dict[str, int] = field(default_factory=dict)  # individuals, by tracking
    individuals: dict[str, int] = field(default_factory=dict)  # the night's truth
    annotated: list[Path] = field(default_factory=list)
    csv: Path | None = None
    worker_log: Path | None = None

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


def worker_env(settings: Settings) -> dict[str, str]:
    """The caller's environment with the resolved URLs, so the worker uses the same stores."""
    env = dict(os.environ)
    env.update(
        TRAPQ_DATABASE_URL=settings.database_url,
        TRAPQ_BROKER_URL=settings.broker_url,
        TRAPQ_RESULT_BACKEND=settings.result_backend,
        TRAPQ_QUEUE=settings.queue,
        TRAPQ_CLASSIFIER_TAXONOMY=settings.classifier_taxonomy,
        PYTHONUNBUFFERED="1",
    )
    return env


def start_worker(settings: Settings, log: Path, concurrency: int) -> subprocess.Popen[bytes]:
    argv = celery_argv(
        settings.queue, "demo@%h", pool="threads", concurrency=concurrency, loglevel="WARNING"
    )
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, env=worker_env(settings), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """Warm shutdown (SIGTERM lets the chunk in hand finish), then SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(WORKER_STOP_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for_job(
    settings: Settings,
    job_id: int,
    proc: subprocess.Popen[bytes],
    log: Path,
    on_progress: Callable[[JobStatus], None],
    timeout_s: float,
) -> JobStatus:
    """Poll the job store until every capture has ended; fail fast if the worker dies."""
    factory = ready_session_factory(settings)
    deadline = time.monotonic() + timeout_s
    while True:
        with factory() as session:
            status = job_status(session, job_id)
        assert status is not None
        on_progress(status)
        if status.ended >= status.job.n_captures:
            return status
        if proc.poll() is not None:
            raise UserError(f"the demo worker exited with code {proc.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise UserError(f"the demo job did not finish in {timeout_s:.0f} s; see {log}")
        time.sleep(0.5)


def wait_for_tracking(settings: Settings, job_id: int, timeout_s: float) -> None:
    """The worker tracks the job once its last chunk ends; past the timeout (a worker busy
    elsewhere), track here, which gives the same occurrences."""
    factory = ready_session_factory(settings)
    deadline = time.monotonic() + (timeout_s if settings.track_after_job else 0.0)
    while time.monotonic() < deadline:
        with factory() as session:
            if session.scalar(select(Job.tracked_at).where(Job.id == job_id)) is not None:
                return
        time.sleep(0.5)
    track_job(factory, job_id, settings)


def annotate(path: Path, boxes: list[DetectionRecord], out: Path) -> None:
    """Draw boxes with kind and score (the classifier's, else the detector's) on a copy of the
    capture, labels readable at 4K too."""
    with Image.open(path) as im:
        image = ImageOps.exif_transpose(im).convert("RGB")
    draw = ImageDraw.Draw(image)
    width = max(2, image.width // 640)
    font = ImageFont.load_default(size=max(14, image.width // 80))
    for b in boxes:
        draw.rectangle((b.x1, b.y1, b.x2, b.y2), outline=(220, 20, 60), width=width)
        shown = b.classifications[0] if b.classifications else b
        text = f"{shown.label} {shown.score:.2f}"
        left, top, right, bottom = draw.textbbox((b.x1, b.y1), text, font=font, anchor="lb")
        draw.rectangle((left - 2, top - 2, right + 2, bottom), fill=(220, 20, 60))
        draw.text((b.x1, b.y1), text, fill="white", font=font, anchor="lb")
    image.save(out, quality=85)


def demo_deployment(night: Path, seed: int, captures: int) -> str:
    """The deployment of exactly this night: its seed, size and folder.

    Runs share the job store (.trapq by default), and enqueue takes all of a deployment's
    captures: a run with another --out or --captures gets a deployment of its own, so it
    enqueues only the night it generated; the same command again reuses its own.
    """
    where = hashlib.sha256(str(night.resolve()).encode()).hexdigest()[:8]
    return f"demo-night-{seed}-{captures}-{where}"


def run_demo(
    settings: Settings,
    captures: int,
    out: Path,
    seed: int,
    chunk_size: int,
    on_progress: Callable[[JobStatus], None],
    annotate_n: int = 4,
    timeout_s: float = 1800.0,
    taxa: list[str] | None = None,
) -> DemoReport:
    """`taxa`: the deployment's taxa list (None: every label), applied with the taxonomy of
    TRAPQ_CLASSIFIER_TAXONOMY when the settings name one."""
    out.mkdir(parents=True, exist_ok=True)
    night = out / "captures"
    listing = out / "captures.txt"
    # insects that stay over several captures (some there from the first), so the demo's
    # occurrences count individuals against a known truth
    generated = generate_tracked_night(night, captures, seed,
                                       behaviour=NightBehaviour(initial=12.0))
    listing.write_text("".join(f"{night.name}/{truth.file}\n" for truth in generated))
    deployment = demo_deployment(night, seed, captures)
    import_source(settings, str(listing), deployment)
    with ready_session_factory(settings).begin() as session:
        set_taxa_list(session, deployment, taxa)
    queued = enqueue(settings, deployment, chunk_size=chunk_size)
    assert queued.job_id is not None
    log = out / "worker.log"
    started = time.monotonic()
    proc = start_worker(settings, log, concurrency=settings.concurrency)
    dispatcher, dispatching = run_in_thread(settings)
    try:
        status = wait_for_job(settings, queued.job_id, proc, log, on_progress, timeout_s)
        seconds = time.monotonic() - started
        wait_for_tracking(settings, queued.job_id, TRACKING_WAIT_S)
    finally:
        dispatcher.stop.set()
        stop_worker(proc)
        dispatching.join(WORKER_STOP_S)
    factory = ready_session_factory(settings)
    report = DemoReport(
        job_id=queued.job_id,
        captures=status.job.n_captures,
        done=status.captures.get(ItemState.DONE, 0),
        failed=status.captures.get(ItemState.FAILED, 0),
        seconds=seconds,
        worker_log=log,
    )
    annotated_dir = out / "annotated"
    annotated_dir.mkdir(exist_ok=True)
    with factory() as session:
        for answer, rank, n in answer_counts(session, queued.job_id, settings.classifier):
            report.kinds[answer] = report.kinds.get(answer, 0) + n
            report.ranks[answer] = rank or ""
        for c in occurrence_counts(session, queued.job_id):
            report.occurrences[c.label] = report.occurrences.get(c.label, 0) + c.occurrences
    seen: dict[int, str] = {i.individual: i.kind for t in generated for i in t.insects
                            if i.individual is not None}
    for kind in seen.values():
        report.individuals[kind] = report.individuals.get(kind, 0) + 1
    with factory() as session:
        for capture_id, uri in busiest_captures(session, queued.job_id, annotate_n):
            source = Path(uri.removeprefix("file://"))
            boxes = boxes_of(session, queued.job_id, capture_id, settings.classifier)
            report.annotated.append(annotated_dir / source.name)
            annotate(source, boxes, report.annotated[-1])
    report.csv = out / "detections.csv"
    with report.csv.open("w", newline="") as f, factory() as session:
        write_csv(session, queued.job_id, f)
    return report
