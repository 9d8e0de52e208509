"""The fast lane: a few images classified ahead of the batch backlog.

`classify_images` is the one entry point, for `trapq classify` and for Python callers (the
HTTP service of `trapq serve`):

    from tasks.fast_lane import classify_images
    result = classify_images(settings, ["/data/a.jpg", "https://host/b.jpg"], wait=True)
    for image in result.images:
        image.error or image.detections  # per image: its own error, or its boxes

The images become captures of the scratch deployment `interactive` in the project
`interactive` and one small job over exactly them. The dispatcher releases that project's
chunks before any batch work, apart from the batch window, on the lane queue that every
worker consumes first (`<queue>.interactive`), with at most TRAPQ_INTERACTIVE_SHARE of the
live slots (at least one) out at once, so batch work keeps the rest of the pool. A local
file that is missing or not an image gets its own error here and is left out; a URL is
fetched by the worker, which records its error the same way.

Boxes given for an image (Antenna's request `detections`) are classified without running the
detector, by the re-classification path of `trapq enqueue --reuse-detections`: they are
recorded as the detections of a job that ends at once and is never dispatched, and the
fast-lane job reuses that job's boxes (db.reuse.stored_boxes), so workers only crop and
classify them. An image without given boxes is detected as usual.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from PIL import Image, UnidentifiedImageError
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db.boxes import DetectionRecord, item_boxes
from db.imports import get_or_create_deployment, insert_captures
from db.jobs import create_job
from db.models import Capture, Job, JobCapture
from db.pipelines import StoredPipeline
from db.projects import INTERACTIVE_PROJECT, get_or_create_project, set_deployment_project
from db.results import finish_chunk, write_results
from db.states import JOB_ENDED, ItemState
from tasks.errors import UserError
from tasks.pipeline import resolve_pipeline
from tasks.settings import Settings
from tasks.store import database_errors, ready_session_factory
from tasks.wakeups import Wakeup

SCRATCH_DEPLOYMENT = "interactive"
LANE_CHUNK_SIZE = 4  # images per fast-lane chunk: several slots share a larger request
POLL_S = 0.1  # without a NOTIFY (SQLite, one missed): how often the job is looked at


@dataclass(frozen=True)
class ImageResult:
    image: str  # as given
    state: str  # done, failed, pending (not finished within the wait), or refused
    error: str | None = None
    detections: list[DetectionRecord] = field(default_factory=list)


@dataclass(frozen=True)
class FastLaneResult:
    job_id: int | None  # None when every image was refused
    images: list[ImageResult]
    seconds: float


def local_problem(image: str) -> str | None:
    """Why a local image cannot be classified (missing, unreadable, not an image), or None;
    URLs are the worker's to fetch."""
    scheme = urlparse(image).scheme
    if scheme in ("http", "https", "s3"):
        return None
    path = Path(urlparse(image).path if scheme == "file" else image)
    if not path.is_file():
        return "no such file"
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        return f"not an image ({e})"
    return None


def _uri(image: str) -> str:
    scheme = urlparse(image).scheme
    if scheme in ("http", "https", "s3", "file"):
        return image
    return Path(image).resolve().as_uri()


def classify_images(
    settings: Settings,
    images: Sequence[str],
    *,
    pipeline: str | None = None,
    wait: bool = True,
    timeout_s: float = 300.0,
    boxes: Mapping[str, Sequence[DetectionRecord]] | None = None,
) -> FastLaneResult:
    """Classify `images` (paths or URLs) in the fast lane with `pipeline` (NAME or
    NAME@VERSION; None: the TRAPQ_* settings' `default`). With `wait`, return once each has
    ended (or `timeout_s` passed, leaving the rest `pending`), with its detections; without,
    at once, every image `pending` (its job id says where to look). `boxes` maps an image
    (as given) to the boxes to classify in it instead of detecting."""
    if not images:
        raise UserError("give at least one image to classify")
    started = time.monotonic()
    refused = {image: problem for image in images if (problem := local_problem(image))}
    accepted = [image for image in images if image not in refused]
    if not accepted:
        return FastLaneResult(None, [ImageResult(i, "refused", refused[i]) for i in images],
                              time.monotonic() - started)
    factory = ready_session_factory(settings)
    stored = resolve_pipeline(settings, factory, pipeline)
    uris = {image: _uri(image) for image in accepted}
    with database_errors(settings), factory.begin() as session:
        deployment_id, capture_of = _record(session, list(uris.values()))
        given = {capture_of[uris[i]]: list(b) for i, b in (boxes or {}).items() if i in uris}
        plan = create_job(
            session,
            deployment_id,
            pipeline=stored.spec,
            fingerprint=stored.fingerprint,
            pipeline_id=stored.id,
            chunk_size=LANE_CHUNK_SIZE,
            capture_ids=list(capture_of.values()),
            boxes_from_job_id=_given_boxes_job(session, deployment_id, stored, given),
        )
    by_uri: dict[str, tuple[str, str | None, list[DetectionRecord]]] = {}
    if wait:
        _wait_for_end(settings, factory, plan.job_id, started + timeout_s)
        with database_errors(settings), factory() as session:
            by_uri = _results(session, plan.job_id)
    results = []
    for image in images:
        if image in refused:
            results.append(ImageResult(image, "refused", refused[image]))
            continue
        state, error, boxes = by_uri.get(uris[image], (ItemState.PENDING.value, None, []))
        results.append(ImageResult(image, state, error, boxes))
    return FastLaneResult(plan.job_id, results, time.monotonic() - started)


def _wait_for_end(settings: Settings, factory: sessionmaker[Session], job_id: int,
                  deadline: float) -> None:
    """Until the job ended or the deadline: looked at again on each chunk's end (NOTIFY,
    tasks.wakeups) and at least every POLL_S."""
    wake = Wakeup(factory.kw["bind"], POLL_S)
    never = threading.Event()
    try:
        while time.monotonic() < deadline:
            with database_errors(settings), factory() as session:
                if session.scalar(select(Job.state).where(Job.id == job_id)) in JOB_ENDED:
                    return
            wake.wait(never)
    finally:
        wake.close()


def _record(session: Session, uris: list[str]) -> tuple[int, dict[str, int]]:
    """The scratch deployment and each URI's capture there (made if missing)."""
    get_or_create_project(session, INTERACTIVE_PROJECT)
    deployment_id = get_or_create_deployment(session, SCRATCH_DEPLOYMENT)
    set_deployment_project(session, SCRATCH_DEPLOYMENT, INTERACTIVE_PROJECT)
    insert_captures(
        session, deployment_id,
        [{"uri": u, "captured_at": None, "width": None, "height": None} for u in uris],
    )
    found = dict(
        session.execute(
            select(Capture.uri, Capture.id).where(
                Capture.deployment_id == deployment_id, Capture.uri.in_(uris)
            )
        ).all()
    )
    return deployment_id, {u: found[u] for u in dict.fromkeys(uris)}


@dataclass(frozen=True)
class _Given:
    """One capture's given boxes, in the shape the results writer takes (db.results)."""

    key: int
    detections: list[DetectionRecord]
    width: int | None = None
    height: int | None = None
    error_kind: None = None
    error: None = None


def _given_boxes_job(session: Session, deployment_id: int, stored: StoredPipeline,
                     given: dict[int, list[DetectionRecord]]) -> int | None:
    """A job whose detections are the given boxes, done in this transaction, so no
    dispatcher ever sees it pending. Neither its fingerprint nor its detector fingerprint is
    the pipeline's: it classified nothing, so no capture counts as processed by the pipeline
    through it, and no detector found these boxes, so `--reuse-detections` never picks it."""
    if not given:
        return None
    unique = hashlib.sha256(f"given boxes {stored.fingerprint}".encode()).hexdigest()
    plan = create_job(
        session, deployment_id, pipeline=stored.spec, fingerprint=unique,
        pipeline_id=stored.id, chunk_size=len(given), capture_ids=list(given),
    )
    session.execute(update(Job).where(Job.id == plan.job_id).values(detector_fingerprint=unique))
    write_results(session, plan.job_id, [_Given(cid, boxes) for cid, boxes in given.items()])
    for chunk_id in plan.chunk_ids:
        finish_chunk(session, chunk_id, fetch_s=0.0, gpu_s=0.0, write_s=0.0, metrics={})
    return plan.job_id


def _results(session: Session,
             job_id: int) -> dict[str, tuple[str, str | None, list[DetectionRecord]]]:
    """Per capture URI: its work item's state and error, and its boxes with their top-k."""
    items = session.execute(
        select(Capture.id, Capture.uri, JobCapture.state, JobCapture.error)
        .join(Capture, Capture.id == JobCapture.capture_id)
        .where(JobCapture.job_id == job_id)
    ).all()
    boxes = item_boxes(session, [(job_id, capture_id) for capture_id, _, _, _ in items])
    return {
        uri: (state, error, boxes[(job_id, capture_id)])
        for capture_id, uri, state, error in items
    }
