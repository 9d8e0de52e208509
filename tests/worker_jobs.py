"""Jobs for worker tests: small generated JPEGs, captures and a job in PostgreSQL, messages sent.

Rows go in through the job store's own functions (db.imports, db.jobs) and messages through
the producer's send_chunks, so a worker test sees exactly what `trapq enqueue` would send.
"""

from __future__ import annotations

import functools
import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from db.imports import get_or_create_deployment, insert_captures
from db.jobs import JobPlan, create_job
from db.models import Chunk, Classification, Detection, Job, JobCapture
from db.session import make_sessionmaker
from inference.pipeline_spec import PipelineSpec
from tasks.pipeline import pipeline_spec
from tasks.producer import send_chunks
from tasks.settings import Settings

BOXES_PER_IMAGE = 20  # the constant_boxes detector's grid
ENDED = ("done", "failed", "cancelled")


def worker_env(service_env: dict[str, str], **overrides: str) -> dict[str, str]:
    """The zero-cost detector, a random tiny classifier, fast heartbeats and short retries."""
    env = dict(service_env)
    env.update(
        TRAPQ_DETECTOR="constant_boxes",
        TRAPQ_CLASSIFIER="demo_classifier",
        TRAPQ_RANDOM_WEIGHTS="true",
        TRAPQ_HEARTBEAT_S="0.5",
        TRAPQ_WRITE_BATCH_SIZE="4",
        TRAPQ_BATCH_SIZE="4",
        TRAPQ_FETCH_THREADS="2",
        TRAPQ_DECODE_THREADS="1",
        TRAPQ_RETRY_BACKOFF_S="1",
        TRAPQ_RETRY_BACKOFF_MAX_S="2",
        MKL_NUM_THREADS="1",
    )
    env.update(overrides)
    return env



# Deadlines for fault tests, below the settings' 10 s floors (TRAPQ_TEST_TIMEOUTS): a killed
# worker's chunk goes back on the queue VISIBILITY_S after its delivery, within one 1 s sweep
# of a live worker of the queue, so a fault costs a test seconds. Chunks here last well under
# the soft deadline (a few small images).
FAULT_TIMEOUTS = {
    "TRAPQ_TEST_TIMEOUTS": "true",
    "TRAPQ_CHUNK_SOFT_TIME_LIMIT_S": "5",
    "TRAPQ_CHUNK_TIME_LIMIT_S": "6",
    "TRAPQ_VISIBILITY_TIMEOUT_S": "7",
    "TRAPQ_REDELIVERY_SWEEP_S": "1",
}
VISIBILITY_S = float(FAULT_TIMEOUTS["TRAPQ_VISIBILITY_TIMEOUT_S"])


def env_pipeline(env: dict[str, str]) -> PipelineSpec:
    """The pipeline a worker started with `env` loads, as `trapq enqueue` records it."""
    given = {k.removeprefix("TRAPQ_").lower(): v for k, v in env.items() if k.startswith("TRAPQ_")}
    return pipeline_spec(Settings(_env_file=None, **given))  # type: ignore[call-arg]


@functools.cache
def worker_pipeline() -> PipelineSpec:
    """worker_env's pipeline: the zero-cost detector and a random demo classifier."""
    return env_pipeline(worker_env({}))


def kill_trial_env(service_env: dict[str, str]) -> dict[str, str]:
    """worker_env for a worker killed mid-chunk (FAULT_TIMEOUTS): one slow fetch at a time and
    small write batches leave a chunk half written when killed."""
    return worker_env(
        service_env, **FAULT_TIMEOUTS, TRAPQ_FETCH_THREADS="1", TRAPQ_WRITE_BATCH_SIZE="2"
    )


def settings_of(env: dict[str, str]) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=Path(env["TRAPQ_DATA_DIR"]),
        database_url=env["TRAPQ_DATABASE_URL"],
        broker_url=env["TRAPQ_BROKER_URL"],
        result_backend=env["TRAPQ_RESULT_BACKEND"],
        queue=env["TRAPQ_QUEUE"],
    )


def jpeg_bytes(width: int = 160, height: int = 120, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(6):
        x, y = rng.randrange(width - 20), rng.randrange(height - 20)
        image.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 20, y + 20))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


def write_jpegs(folder: Path, n: int, width: int = 160, height: int = 120) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i:05d}.jpg"
        path.write_bytes(jpeg_bytes(width, height, seed=i))
        paths.append(path)
    return paths


@dataclass(frozen=True)
class MadeJob:
    job_id: int
    chunk_ids: list[int]
    n_captures: int


def make_job(
    engine: Engine, uris: list[str], *, chunk_size: int, deployment: str = "test-deployment",
    spec: PipelineSpec | None = None,
) -> MadeJob:
    """A job over `uris` running `spec` (worker_env's pipeline unless given), recorded with
    its fingerprint as `trapq enqueue` does."""
    factory = make_sessionmaker(engine)
    with factory.begin() as s:
        dep = get_or_create_deployment(s, deployment)
        insert_captures(
            s, dep, [{"uri": u, "captured_at": None, "width": None, "height": None} for u in uris]
        )
        plan = plan_job(s, dep, spec=spec, chunk_size=chunk_size)
    return MadeJob(plan.job_id, plan.chunk_ids, plan.n_captures)


def plan_job(
    s: Session, deployment_id: int, *, spec: PipelineSpec | None = None, **options: Any
) -> JobPlan:
    """db.jobs.create_job with `spec` (worker_env's pipeline unless given) and its fingerprint."""
    spec = spec or worker_pipeline()
    return create_job(
        s, deployment_id, pipeline=spec.to_dict(), fingerprint=spec.fingerprint(), **options
    )


def send(env: dict[str, str], engine: Engine, chunk_ids: list[int]) -> None:
    result = send_chunks(settings_of(env), make_sessionmaker(engine), chunk_ids)
    assert result.sent == len(chunk_ids), result


def item_states(engine: Engine, job_id: int) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(
            conn.execute(
                select(JobCapture.state, func.count())
                .where(JobCapture.job_id == job_id)
                .group_by(JobCapture.state)
            ).all()
        )


def chunk_rows(engine: Engine, job_id: int) -> list[Chunk]:
    with make_sessionmaker(engine)() as s:
        return list(s.scalars(select(Chunk).where(Chunk.job_id == job_id).order_by(Chunk.seq)))


def detections_per_capture(engine: Engine, job_id: int) -> dict[int, int]:
    with engine.connect() as conn:
        return dict(
            conn.execute(
                select(Detection.capture_id, func.count())
                .where(Detection.job_id == job_id)
                .group_by(Detection.capture_id)
            ).all()
        )


def classifications_per_detection(engine: Engine, job_id: int, classifier: str) -> dict[int, int]:
    """How many of the job's detections have 0, 1, 2, ... classifications by `classifier`:
    exactly one each reads {1: number of detections}."""
    per_detection = (
        select(Detection.id, func.count(Classification.id).label("n"))
        .outerjoin(
            Classification,
            (Classification.detection_id == Detection.id)
            & (Classification.classifier == classifier),
        )
        .where(Detection.job_id == job_id)
        .group_by(Detection.id)
        .subquery()
    )
    with engine.connect() as conn:
        return dict(
            conn.execute(
                select(per_detection.c.n, func.count()).group_by(per_detection.c.n)
            ).all()
        )


def job_state(engine: Engine, job_id: int) -> str:
    with engine.connect() as conn:
        return conn.scalar(select(Job.state).where(Job.id == job_id)) or ""
