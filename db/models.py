"""Typed models of the job store (see DESIGN.md, "Data model")."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Date,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from db.states import AntennaTaskState, ChunkState, ItemState, JobState

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets 64-bit ids.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Every timestamp column: written as UTC, read back timezone-aware on every backend
    (PostgreSQL's timestamptz keeps the zone; SQLite keeps none and returns naive values,
    which are the UTC they were written in)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.astimezone(UTC) if value is not None and value.tzinfo else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and not value.tzinfo else value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UtcDateTime}


class Project(Base):
    """Who shares the GPU pool (db.projects): a weight, a cap on chunks out, and the
    start-time fair queueing tags the dispatcher keeps (db.dispatch)."""

    __tablename__ = "projects"
    __table_args__ = (UniqueConstraint("name", name="uq_projects_name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    weight: Mapped[float] = mapped_column(Float)
    max_in_flight: Mapped[int | None] = mapped_column(Integer)  # None: no cap
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    vstart: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))
    vfinish: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))
    # Below it a species answer rolls up the taxonomy (0010); None: TRAPQ_SPECIES_THRESHOLD.
    species_threshold: Mapped[float | None] = mapped_column(Float)


class Deployment(Base):
    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Camtrap DP deployment terms (migration 0003), set by `trapq deployments set`.
    location_id: Mapped[str | None] = mapped_column(String(200))
    location_name: Mapped[str | None] = mapped_column(String(200))
    latitude: Mapped[float | None] = mapped_column(Float)
    longitude: Mapped[float | None] = mapped_column(Float)
    coordinate_uncertainty_m: Mapped[int | None] = mapped_column(Integer)
    deployment_start: Mapped[datetime | None]
    deployment_end: Mapped[datetime | None]
    capture_method: Mapped[str | None] = mapped_column(String(32))  # activityDetection|timeLapse
    camera_id: Mapped[str | None] = mapped_column(String(200))
    camera_model: Mapped[str | None] = mapped_column(String(200))
    camera_height_m: Mapped[float | None] = mapped_column(Float)
    setup_by: Mapped[str | None] = mapped_column(String(200))
    habitat: Mapped[str | None] = mapped_column(Text)
    comments: Mapped[str | None] = mapped_column(Text)
    # The species that can occur here (0010): labels, taxon names or GBIF keys, as given.
    taxa_list: Mapped[list[Any] | None] = mapped_column(JSON)
    # None: the `default` project.
    project_id: Mapped[int | None] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"),
        ForeignKey("projects.id", ondelete="SET NULL", name="fk_deployments_project"),
    )


class Capture(Base):
    __tablename__ = "captures"
    __table_args__ = (
        UniqueConstraint("deployment_id", "uri", name="uq_captures_deployment_uri"),
        Index("ix_captures_deployment_captured_at", "deployment_id", "captured_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    deployment_id: Mapped[int] = mapped_column(
        ForeignKey("deployments.id", ondelete="CASCADE")
    )
    uri: Mapped[str] = mapped_column(Text)
    captured_at: Mapped[datetime | None]
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)


class Pipeline(Base):
    """A named, versioned pipeline (db.pipelines): one spec, one fingerprint, one row."""

    __tablename__ = "pipelines"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_pipelines_name_version"),
        UniqueConstraint("fingerprint", name="uq_pipelines_fingerprint"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    version: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]] = mapped_column()  # PipelineSpec.to_dict()
    fingerprint: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(Text, default="", server_default="")
    # The TRAPQ_* model settings it was recorded from (tasks.pipeline.settings_key), if any.
    settings_key: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_deployment", "deployment_id"),
        Index("ix_jobs_fingerprint", "fingerprint"),
        Index("ix_jobs_deployment_detector", "deployment_id", "detector_fingerprint"),
        Index("ix_jobs_project_state", "project_id", "state"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING)
    pipeline: Mapped[dict[str, Any]]  # PipelineSpec.to_dict()
    fingerprint: Mapped[str] = mapped_column(String(64))  # PipelineSpec.fingerprint()
    chunk_size: Mapped[int] = mapped_column(Integer)
    n_captures: Mapped[int] = mapped_column(Integer, default=0)
    n_chunks: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    # When its detections were last linked into occurrences (None: not yet).
    tracked_at: Mapped[datetime | None]
    # A re-classification job: its boxes are this job's detections (the detector not run).
    boxes_from_job_id: Mapped[int | None] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"),
        ForeignKey("jobs.id", ondelete="SET NULL", name="fk_jobs_boxes_from_job"),
    )
    # The named pipeline version it runs (None once that is removed; `pipeline` stays).
    pipeline_id: Mapped[int | None] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"),
        ForeignKey("pipelines.id", ondelete="SET NULL", name="fk_jobs_pipeline"),
    )
    # db.pipelines.detector_fingerprint(pipeline): equal values find the same boxes (db.reuse).
    detector_fingerprint: Mapped[str] = mapped_column(String(64))
    # The project its deployment had when it was enqueued, and its fair-queueing tags among
    # that project's jobs (db.dispatch).
    project_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"),
        ForeignKey("projects.id", name="fk_jobs_project"),
    )
    vstart: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))
    vfinish: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))

    deployment: Mapped[Deployment] = relationship()


class Chunk(Base):
    __tablename__ = "chunks"
    __table_args__ = (
        UniqueConstraint("job_id", "seq", name="uq_chunks_job_seq"),
        Index("ix_chunks_job_state", "job_id", "state"),
        Index("ix_chunks_state", "state"),
        Index("ix_chunks_finished_at", "finished_at"),  # the Antenna bridge's pool rate
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=ChunkState.PENDING)
    n_items: Mapped[int] = mapped_column(Integer, default=0)
    task_id: Mapped[str | None] = mapped_column(String(64))
    # attempts: runs started since the last requeue; deliveries: every start, ever.
    # deliveries past a limit stop a chunk that kills its worker from looping forever.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    # claim: every claim ever, never reset; each delivery writes only while it still holds
    # the value its claim set (db.results.check_claim), so a partitioned worker's late
    # writes are refused.
    claim: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    worker: Mapped[str | None] = mapped_column(String(200))
    # released_at: its task id was recorded, before the message went out; queued_at: the
    # broker took the message. Queued without queued_at: in doubt (db.dispatch).
    released_at: Mapped[datetime | None]
    queued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    n_done: Mapped[int] = mapped_column(Integer, default=0)
    n_failed: Mapped[int] = mapped_column(Integer, default=0)
    fetch_s: Mapped[float | None] = mapped_column(Float)
    gpu_s: Mapped[float | None] = mapped_column(Float)
    write_s: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)


class JobCapture(Base):
    """The work item. Its state changes in the transaction that writes the capture's results.

    No foreign keys: only db.jobs.create_job writes these, a million in one INSERT ... SELECT
    that takes job, capture and chunk from their tables, and PostgreSQL checks a foreign key
    row by row (locking every capture), which took 3/4 of the time to enqueue a million
    captures. Whatever deletes a job or a capture must delete its work items too.
    """

    __tablename__ = "job_captures"
    __table_args__ = (Index("ix_job_captures_chunk_state", "chunk_id", "state"),
                      Index("ix_job_captures_job_state", "job_id", "state"))

    job_id: Mapped[int] = mapped_column(BigId, primary_key=True)
    capture_id: Mapped[int] = mapped_column(BigId, primary_key=True)
    chunk_id: Mapped[int] = mapped_column(BigId)
    state: Mapped[str] = mapped_column(String(16), default=ItemState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_kind: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime | None]


class Detection(Base):
    __tablename__ = "detections"
    __table_args__ = (
        ForeignKeyConstraint(
            ["job_id", "capture_id"],
            ["job_captures.job_id", "job_captures.capture_id"],
            ondelete="CASCADE",
            name="fk_detections_job_capture",
        ),
        Index("ix_detections_job_capture", "job_id", "capture_id"),
        Index("ix_detections_source", "source_detection_id"),
        Index("ix_detections_occurrence", "occurrence_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))
    capture_id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))
    # Box in original-image pixels, (x1, y1) top-left, (x2, y2) bottom-right.
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    x2: Mapped[float] = mapped_column(Float)
    y2: Mapped[float] = mapped_column(Float)
    score: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(200))
    # A copy made by a re-classification job: the detection whose box it reuses (the
    # original's, never another copy's, so all copies of one box share one source).
    source_detection_id: Mapped[int | None] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"),
        ForeignKey("detections.id", ondelete="SET NULL", name="fk_detections_source"),
    )
    # The classifier's penultimate features as float16 bytes (TRAPQ_STORE_EMBEDDINGS).
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)
    # The individual this detection is a sighting of, once the job is tracked.
    occurrence_id: Mapped[int | None] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"),
        ForeignKey("occurrences.id", ondelete="SET NULL", name="fk_detections_occurrence"),
    )


class Classification(Base):
    __tablename__ = "classifications"
    __table_args__ = (Index("ix_classifications_detection", "detection_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    detection_id: Mapped[int] = mapped_column(ForeignKey("detections.id", ondelete="CASCADE"))
    classifier: Mapped[str] = mapped_column(String(200))
    label: Mapped[str] = mapped_column(String(200))
    score: Mapped[float] = mapped_column(Float)
    topk: Mapped[list[Any] | None] = mapped_column(JSON)  # the labels', after any taxa list
    # With a taxonomy, `label` may be a higher taxon: its rank, and how it was reached
    # (inference.rollup.SOURCES; None before 0010).
    rank: Mapped[str | None] = mapped_column(String(32))
    prediction_source: Mapped[str | None] = mapped_column(String(32))
    # The full softmax before any taxa list, float16 (TRAPQ_STORE_PROBABILITIES): re-applying
    # another list or threshold reads it.
    probabilities: Mapped[bytes | None] = mapped_column(LargeBinary)


class Occurrence(Base):
    """One individual insect: a track of one job's detections over consecutive captures of
    one night. Abundance counts these, not detections."""

    __tablename__ = "occurrences"
    __table_args__ = (Index("ix_occurrences_job_night", "job_id", "night"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"))
    night: Mapped[date] = mapped_column(Date)  # the evening the night's span of captures began
    first_capture_id: Mapped[int] = mapped_column(
        ForeignKey("captures.id", ondelete="CASCADE")
    )
    last_capture_id: Mapped[int] = mapped_column(ForeignKey("captures.id", ondelete="CASCADE"))
    first_at: Mapped[datetime]
    last_at: Mapped[datetime]
    n_detections: Mapped[int] = mapped_column(Integer)
    # Score-weighted vote over the track's classifications; score = winner's sum / votes.
    label: Mapped[str] = mapped_column(String(200))
    score: Mapped[float] = mapped_column(Float)


class TrackLink(Base):
    """Why two detections are one individual: the later one, the one before it in the track,
    and the link's cost, so a person can review the doubtful (costly) links."""

    __tablename__ = "track_links"
    __table_args__ = (Index("ix_track_links_occurrence_cost", "occurrence_id", "cost"),)

    detection_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"),
        ForeignKey("detections.id", ondelete="CASCADE"),
        primary_key=True,
    )
    previous_detection_id: Mapped[int] = mapped_column(
        ForeignKey("detections.id", ondelete="CASCADE")
    )
    occurrence_id: Mapped[int] = mapped_column(ForeignKey("occurrences.id", ondelete="CASCADE"))
    cost: Mapped[float] = mapped_column(Float)


class AntennaImage(Base):
    """An Antenna image as a capture of its project's deployment: the same image id always
    finds the same capture, whatever URL (signed, expiring) a task gives for it."""

    __tablename__ = "antenna_images"

    deployment_id: Mapped[int] = mapped_column(
        ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True
    )
    image_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    capture_id: Mapped[int] = mapped_column(ForeignKey("captures.id", ondelete="CASCADE"))


class AntennaTask(Base):
    """One task taken from Antenna and its answer (db.antenna): waiting for its capture's
    work item, ready (answer stored), posting (a bridge claimed it), answered. The answer is
    posted at most once per delivery; a redelivered task is answered from `answer`."""

    __tablename__ = "antenna_tasks"
    __table_args__ = (
        UniqueConstraint("antenna", "antenna_job_id", "task_id", name="uq_antenna_tasks_task"),
        Index("ix_antenna_tasks_state_deadline", "state", "deadline"),
        Index("ix_antenna_tasks_job_capture", "job_id", "capture_id"),
        Index("ix_antenna_tasks_ready_at", "ready_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    antenna: Mapped[str] = mapped_column(String(200))  # host:port of the Antenna API
    project_id: Mapped[int] = mapped_column(BigInteger)
    antenna_job_id: Mapped[int] = mapped_column(BigInteger)
    task_id: Mapped[str] = mapped_column(String(200))
    image_id: Mapped[str | None] = mapped_column(String(200))
    pipeline_slug: Mapped[str] = mapped_column(String(200))
    reply_subject: Mapped[str] = mapped_column(Text)
    deliveries: Mapped[int] = mapped_column(Integer, default=1)
    first_received_at: Mapped[datetime]
    received_at: Mapped[datetime]
    deadline: Mapped[datetime]  # received + ack wait
    job_id: Mapped[int | None] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"),
        ForeignKey("jobs.id", ondelete="SET NULL", name="fk_antenna_tasks_job"),
    )
    capture_id: Mapped[int | None] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))
    state: Mapped[str] = mapped_column(String(16), default=AntennaTaskState.WAITING)
    answer: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    ready_at: Mapped[datetime | None]
    answered_at: Mapped[datetime | None]
    poster: Mapped[str | None] = mapped_column(String(200))  # the bridge that posted it
