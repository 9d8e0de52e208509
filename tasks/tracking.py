"""Tracking a job: its detections linked into occurrences, night by night.

Runs as a Celery task when a job's last chunk ends (tasks.chunk sends it) and again with
`trapq track JOB`. Exactly once in effect: every night is replaced whole in one transaction
under the job's row lock (db.occurrences.replace_night), so a redelivered task, a retry, or a
manual run beside the automatic one leaves the same single set of occurrences.

Memory: one night at a time. Spans (captures split where TRAPQ_NIGHT_GAP_S passes without
one) are tracked one by one; spans that fall on the same night (a trap that paused) are
written together, since a night is what is replaced.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import numpy as np
from celery.utils.log import get_task_logger
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from db.occurrences import (
    JobToTrack,
    NewOccurrence,
    NightDetection,
    SpanCapture,
    drop_other_nights,
    job_to_track,
    mark_tracked,
    replace_night,
    span_detections,
    spans_of,
)
from inference.tracking import Frame, TrackParams, label_vote, night_of, track_night
from tasks.celery_app import TRACK_JOB, app
from tasks.settings import Settings, get_settings
from tasks.store import session_factory

log = get_task_logger(__name__)


@dataclass(frozen=True)
class TrackSummary:
    job_id: int
    nights: int
    detections: int
    occurrences: int
    seconds: float


def track_params(s: Settings) -> TrackParams:
    """The tracker's weights and gates from TRAPQ_TRACK_* settings, each by name: a setting
    renamed on either side fails here (and in type checks), not silently."""
    return TrackParams(
        w_embedding=s.track_w_embedding,
        w_iou=s.track_w_iou,
        w_area=s.track_w_area,
        w_distance=s.track_w_distance,
        w_missed=s.track_w_missed,
        max_cost=s.track_max_cost,
        max_distance=s.track_max_distance,
        max_missed=s.track_max_missed,
        max_gap_s=s.track_max_gap_s,
        embedding_momentum=s.track_embedding_momentum,
    )


def track_job(factory: sessionmaker[Session], job_id: int, settings: Settings) -> TrackSummary:
    """Track every night of the job and replace its occurrences; returns what it wrote."""
    started = time.perf_counter()
    params = track_params(settings)
    with factory() as s:
        job = job_to_track(s, job_id)
    nights: list[date] = []
    pending: list[NewOccurrence] = []
    n_det = n_occ = 0
    for captures in spans_of(factory, job_id, timedelta(seconds=settings.night_gap_s)):
        night = night_of(captures[0].captured_at)
        if nights and night != nights[-1]:
            n_occ += _write(factory, job, nights[-1], pending)
            pending = []
        if not nights or night != nights[-1]:
            nights.append(night)
        with factory() as s:
            dets = span_detections(s, job, captures[0], captures[-1])
        n_det += len(dets)
        pending.extend(occurrences_of(night, captures, dets, params))
    if nights:
        n_occ += _write(factory, job, nights[-1], pending)
    with factory.begin() as s:
        drop_other_nights(s, job_id, nights)
        mark_tracked(s, job_id)
    return TrackSummary(job_id, len(nights), n_det, n_occ, time.perf_counter() - started)


def _write(factory: sessionmaker[Session], job: JobToTrack, night: date,
           occurrences: Sequence[NewOccurrence]) -> int:
    with factory.begin() as s:
        replace_night(s, job, night, occurrences)
    return len(occurrences)


def occurrences_of(night: date, captures: Sequence[SpanCapture],
                   dets: Sequence[NightDetection], params: TrackParams) -> list[NewOccurrence]:
    """Tracks one span of captures and turns each track into an occurrence (first/last capture, the
    score-weighted vote of its labels, its links with their costs)."""
    if not dets:
        return []
    by_capture: dict[int, list[int]] = {}
    for i, d in enumerate(dets):
        by_capture.setdefault(d.capture_id, []).append(i)
    position = {c.capture_id: i for i, c in enumerate(captures)}
    frames = (_frame(c, [dets[i] for i in by_capture.get(c.capture_id, [])])
              for c in captures)
    tracks = track_night(frames, params)
    index = {d.detection_id: i for i, d in enumerate(dets)}
    members: dict[int, list[int]] = {}
    for det_id, t in zip(tracks.detection_ids.tolist(), tracks.track.tolist(), strict=True):
        members.setdefault(t, []).append(index[det_id])
    previous = dict(zip(tracks.detection_ids.tolist(),
                        zip(tracks.previous.tolist(), tracks.cost.tolist(), strict=True),
                        strict=True))
    out = []
    for rows in members.values():
        ordered = sorted(rows, key=lambda i: position[dets[i].capture_id])
        first = captures[position[dets[ordered[0]].capture_id]]
        last = captures[position[dets[ordered[-1]].capture_id]]
        label, score = label_vote([dets[i].label for i in ordered],
                                  [dets[i].score for i in ordered])
        ids = [dets[i].detection_id for i in ordered]
        links = [(d, previous[d][0], previous[d][1]) for d in ids if previous[d][0] >= 0]
        out.append(NewOccurrence(night, first.capture_id, last.capture_id, first.captured_at,
                                 last.captured_at, label, score, ids, links))
    return out


def _frame(capture: SpanCapture, dets: Sequence[NightDetection]) -> Frame:
    boxes = np.asarray([d.box for d in dets], np.float32).reshape(-1, 4)
    width = capture.width or int(boxes[:, 2].max(initial=1))
    height = capture.height or int(boxes[:, 3].max(initial=1))
    embedded = bool(dets) and all(d.embedding is not None for d in dets)
    embeddings = (np.stack([np.frombuffer(d.embedding, np.float16) for d in dets])  # type: ignore[arg-type]
                  if embedded else None)
    return Frame(capture.captured_at.timestamp(), width, height,
                 np.asarray([d.detection_id for d in dets], np.int64), boxes, embeddings)


_s = get_settings()


@app.task(
    name=TRACK_JOB,
    autoretry_for=(sa_exc.OperationalError,),
    max_retries=_s.max_retries,
    default_retry_delay=_s.retry_backoff_s,
)
def track_job_task(job_id: int) -> dict[str, Any]:
    """The automatic run after a job's last chunk; Celery retries it after a database hiccup,
    TRAPQ_RETRY_BACKOFF_S apart, at most TRAPQ_MAX_RETRIES times."""
    s = get_settings()
    summary = track_job(session_factory(s), job_id, s)
    log.info("job %s tracked: %d nights, %d detections -> %d occurrences in %.1f s", job_id,
             summary.nights, summary.detections, summary.occurrences, summary.seconds)
    return {"job_id": job_id, "nights": summary.nights, "detections": summary.detections,
            "occurrences": summary.occurrences}
