"""Occurrences in the job store: a job's captures read night by night for the tracker, each
night's tracks written back in one transaction, and the counts people read.

One night in memory at most: captures come in pages ordered by time and are cut into spans
where no capture came for a while (the caller's gap); a span's detections are read with
their embeddings and species labels only when it is tracked. A night is replaced whole
(occurrences, links, detection refs) under the job's row lock, so tracking twice, or two
trackers at once, leaves one set of occurrences.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import bindparam, delete, func, insert, select, text, tuple_, update
from sqlalchemy.orm import Session, sessionmaker

from db.errors import NoSuchJob
from db.models import (
    Capture,
    Classification,
    Deployment,
    Detection,
    Job,
    JobCapture,
    Occurrence,
    TrackLink,
)
from db.pipelines import job_pipeline
from db.states import ItemState

PAGE = 5000  # captures read per query while cutting spans
_PG_SET_OCCURRENCE = text(
    "UPDATE detections SET occurrence_id = v.oid "
    "FROM unnest(CAST(:dids AS bigint[]), CAST(:oids AS bigint[])) AS v(did, oid) "
    "WHERE detections.id = v.did"
)
_PG_COPY_LINKS = (
    "COPY track_links (detection_id, previous_detection_id, occurrence_id, cost) FROM STDIN"
)


@dataclass(frozen=True)
class SpanCapture:
    capture_id: int
    captured_at: datetime
    width: int | None
    height: int | None


@dataclass(frozen=True)
class NightDetection:
    detection_id: int
    capture_id: int
    box: tuple[float, float, float, float]
    embedding: bytes | None
    label: str  # the species classifier's top-1, else the filter's, else the detector's
    score: float


@dataclass(frozen=True)
class NewOccurrence:
    night: date
    first_capture_id: int
    last_capture_id: int
    first_at: datetime
    last_at: datetime
    label: str
    score: float
    detection_ids: Sequence[int]
    links: Sequence[tuple[int, int, float]]  # (detection, previous detection, cost)


@dataclass(frozen=True)
class JobToTrack:
    job_id: int
    deployment_id: int
    species_classifier: str


def job_to_track(s: Session, job_id: int) -> JobToTrack:
    deployment_id = s.scalar(select(Job.deployment_id).where(Job.id == job_id))
    if deployment_id is None:
        raise NoSuchJob(job_id)
    return JobToTrack(job_id, deployment_id, job_pipeline(s, job_id).classifier.name)


def spans_of(factory: sessionmaker[Session], job_id: int, gap: timedelta
                ) -> Iterator[list[SpanCapture]]:
    """The job's captures with results, in time order, cut where ``gap`` passes without one.
    Each page is read in a short transaction of its own; captures without a time are left
    out (they cannot be placed in a night)."""
    current: list[SpanCapture] = []
    after: tuple[datetime, int] | None = None
    while True:
        q = (
            select(Capture.id, Capture.captured_at, Capture.width, Capture.height)
            .join(JobCapture, JobCapture.capture_id == Capture.id)
            .where(JobCapture.job_id == job_id, JobCapture.state == ItemState.DONE.value,
                   Capture.captured_at.is_not(None))
            .order_by(Capture.captured_at, Capture.id)
            .limit(PAGE)
        )
        if after is not None:
            q = q.where(tuple_(Capture.captured_at, Capture.id) > tuple_(*after))
        with factory() as s:
            page = [SpanCapture(r.id, r.captured_at, r.width, r.height)
                    for r in s.execute(q)]
        for c in page:
            if current and c.captured_at - current[-1].captured_at > gap:
                yield current
                current = []
            current.append(c)
        if len(page) < PAGE:
            break
        after = (page[-1].captured_at, page[-1].capture_id)
    if current:
        yield current


def span_detections(s: Session, job: JobToTrack, first: SpanCapture,
                       last: SpanCapture) -> list[NightDetection]:
    """The job's detections on captures from ``first`` to ``last`` (by time), each with its
    embedding and the label that votes for its occurrence."""
    in_span = (
        select(Detection.id, Detection.capture_id, Detection.x1, Detection.y1, Detection.x2,
               Detection.y2, Detection.embedding, Detection.label, Detection.score)
        .join(Capture, Capture.id == Detection.capture_id)
        .where(
            Detection.job_id == job.job_id,
            tuple_(Capture.captured_at, Capture.id)
            >= tuple_(first.captured_at, first.capture_id),
            tuple_(Capture.captured_at, Capture.id) <= tuple_(last.captured_at, last.capture_id),
        )
        .order_by(Detection.id)
    )
    rows = s.execute(in_span).all()
    ids = [r.id for r in rows]
    labels: dict[int, tuple[str, float, bool]] = {}
    for i in range(0, len(ids), PAGE):
        chunk = ids[i : i + PAGE]
        for det_id, classifier, label, score in s.execute(
            select(Classification.detection_id, Classification.classifier,
                   Classification.label, Classification.score)
            .where(Classification.detection_id.in_(chunk))
        ):
            species = classifier == job.species_classifier
            if det_id not in labels or (species and not labels[det_id][2]):
                labels[det_id] = (label, score, species)
    out = []
    for r in rows:
        label, score, _ = labels.get(r.id, (r.label, r.score, False))
        out.append(NightDetection(r.id, r.capture_id, (r.x1, r.y1, r.x2, r.y2), r.embedding,
                                  label, score))
    return out


def replace_night(s: Session, job: JobToTrack, night: date,
                  occurrences: Sequence[NewOccurrence]) -> None:
    """The night's occurrences, links and detection refs replace whatever the job had for it.
    Call inside a transaction; the job row is locked first, so replacements never interleave."""
    s.execute(select(Job.id).where(Job.id == job.job_id).with_for_update())
    s.execute(delete(Occurrence).where(Occurrence.job_id == job.job_id, Occurrence.night == night))
    if not occurrences:
        return
    ids = s.execute(
        insert(Occurrence).returning(Occurrence.id, sort_by_parameter_order=True),
        [
            {
                "job_id": job.job_id,
                "deployment_id": job.deployment_id,
                "night": night,
                "first_capture_id": o.first_capture_id,
                "last_capture_id": o.last_capture_id,
                "first_at": o.first_at,
                "last_at": o.last_at,
                "n_detections": len(o.detection_ids),
                "label": o.label,
                "score": o.score,
            }
            for o in occurrences
        ],
    ).scalars().all()
    dids = [d for o in occurrences for d in o.detection_ids]
    oids = [oid for oid, o in zip(ids, occurrences, strict=True) for _ in o.detection_ids]
    if s.get_bind().dialect.name == "postgresql":
        # one statement for the night's detections, not one per detection
        s.execute(_PG_SET_OCCURRENCE, {"dids": dids, "oids": oids})
    else:
        s.execute(
            update(Detection.__table__)
            .where(Detection.__table__.c.id == bindparam("did"))
            .values(occurrence_id=bindparam("oid")),
            [{"did": d, "oid": o} for d, o in zip(dids, oids, strict=True)],
            execution_options={"synchronize_session": False},
        )
    links = [(d, p, oid, c) for oid, o in zip(ids, occurrences, strict=True)
             for d, p, c in o.links]
    if not links:
        return
    if s.get_bind().dialect.name == "postgresql":
        # COPY: a night has as many links as detections, 200,000 in a dense one
        driver = s.connection().connection.driver_connection
        with driver.cursor() as cur, cur.copy(_PG_COPY_LINKS) as copy:
            for row in links:
                copy.write_row(row)
    else:
        s.execute(insert(TrackLink.__table__), [
            {"detection_id": d, "previous_detection_id": p, "occurrence_id": oid, "cost": c}
            for d, p, oid, c in links
        ])


def drop_other_nights(s: Session, job_id: int, nights: Sequence[date]) -> None:
    """Occurrences of nights the job no longer has (the night gap changed) go."""
    s.execute(delete(Occurrence).where(Occurrence.job_id == job_id,
                                       Occurrence.night.not_in(list(nights))))


def mark_tracked(s: Session, job_id: int) -> None:
    s.execute(update(Job).where(Job.id == job_id).values(tracked_at=datetime.now(UTC)))


@dataclass(frozen=True)
class NightCount:
    night: date
    label: str
    occurrences: int
    detections: int


def occurrence_counts(s: Session, job_id: int) -> list[NightCount]:
    """Per night and species: occurrences (individuals) and the detections they gather."""
    rows = s.execute(
        select(Occurrence.night, Occurrence.label, func.count(), func.sum(Occurrence.n_detections))
        .where(Occurrence.job_id == job_id)
        .group_by(Occurrence.night, Occurrence.label)
        .order_by(Occurrence.night, Occurrence.label)
    )
    return [NightCount(n, label, int(c), int(d or 0)) for n, label, c, d in rows]


def occurrence_rows(s: Session, job_id: int) -> Iterator[dict[str, object]]:
    """Every occurrence of the job with its deployment and first/last capture URIs (CSV)."""
    first = Capture.__table__.alias("first_capture")
    last = Capture.__table__.alias("last_capture")
    q = (
        select(Occurrence.id.label("occurrence_id"), Occurrence.job_id,
               Deployment.name.label("deployment"), Occurrence.night, Occurrence.label,
               Occurrence.score, Occurrence.n_detections, Occurrence.first_at,
               Occurrence.last_at, first.c.uri.label("first_capture"),
               last.c.uri.label("last_capture"))
        .join(Deployment, Deployment.id == Occurrence.deployment_id)
        .join(first, first.c.id == Occurrence.first_capture_id)
        .join(last, last.c.id == Occurrence.last_capture_id)
        .where(Occurrence.job_id == job_id)
        .order_by(Occurrence.night, Occurrence.first_at, Occurrence.id)
    )
    for row in s.execute(q.execution_options(yield_per=PAGE)):
        yield dict(row._mapping)


@dataclass(frozen=True)
class LinkToReview:
    occurrence_id: int
    label: str
    cost: float
    detection_id: int
    capture: str
    previous_detection_id: int
    previous_capture: str


def doubtful_links(s: Session, job_id: int, n: int) -> list[LinkToReview]:
    """The job's ``n`` costliest links: where a person should look first."""
    here = Capture.__table__.alias("here")
    before = Capture.__table__.alias("before")
    det = Detection.__table__.alias("det")
    prev = Detection.__table__.alias("prev")
    rows = s.execute(
        select(TrackLink.occurrence_id, Occurrence.label, TrackLink.cost, TrackLink.detection_id,
               here.c.uri, TrackLink.previous_detection_id, before.c.uri)
        .join(Occurrence, Occurrence.id == TrackLink.occurrence_id)
        .join(det, det.c.id == TrackLink.detection_id)
        .join(here, here.c.id == det.c.capture_id)
        .join(prev, prev.c.id == TrackLink.previous_detection_id)
        .join(before, before.c.id == prev.c.capture_id)
        .where(Occurrence.job_id == job_id)
        .order_by(TrackLink.cost.desc())
        .limit(n)
    )
    return [LinkToReview(*r) for r in rows]
