"""Named, versioned pipelines, and the one reader of a job's stored pipeline.

A pipeline row is a name, a version and a spec (inference.pipeline_spec.PipelineSpec.to_dict())
with its fingerprint; adding a name again with other contents makes the next version, the same
contents find the version that has them. Jobs pin a row (jobs.pipeline_id) and keep their own
copy of the spec (jobs.pipeline), so a job still says what ran after its pipeline is removed.

Everything that asks what a job ran (exports, status, tracking, re-classification, the worker)
reads it through job_pipeline(s), never the JSON by hand.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.errors import NoSuchJob
from db.models import Job, Pipeline
from db.states import JobState

ROLES = ("detector", "classifier", "filter")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
ADD_ATTEMPTS = 5  # versions tried when others add the same name at the same moment
DEFAULT = "default"


class PipelineError(Exception):
    """A pipeline that cannot be found, added or removed; the message is one line for a user."""


@dataclass(frozen=True)
class PipelineModel:
    """One model of a stored pipeline, as the job store knows it."""

    name: str
    labels: tuple[str, ...]
    sha256: str | None
    weights: str  # the location its bytes come from

    @classmethod
    def of(cls, part: dict[str, Any]) -> PipelineModel:
        """From its part of PipelineSpec.to_dict()."""
        sha = part.get("sha256")
        return cls(
            name=str(part["name"]),
            labels=tuple(str(x) for x in part.get("labels") or ()),
            sha256=str(sha) if sha else None,
            weights=str(part.get("weights") or ""),
        )


@dataclass(frozen=True)
class StoredPipeline:
    """A pipeline as stored: the spec dict (PipelineSpec.from_dict builds it), its fingerprint,
    and the name and version it is known by (None for a job whose pipeline row was removed)."""

    fingerprint: str
    spec: dict[str, Any]
    name: str | None = None
    version: int | None = None
    id: int | None = None

    def model(self, role: str) -> PipelineModel | None:
        """The model of this role; None only for a filter, the one optional model."""
        part = self.spec.get(role)
        return PipelineModel.of(part) if part else None

    @property
    def detector(self) -> PipelineModel:
        return PipelineModel.of(self.spec["detector"])

    @property
    def classifier(self) -> PipelineModel:
        return PipelineModel.of(self.spec["classifier"])

    @property
    def filter(self) -> PipelineModel | None:
        return self.model("filter")

    @property
    def box_threshold(self) -> float:
        return float(self.spec["box_threshold"])

    @property
    def taxonomy(self) -> list[dict[str, Any]]:
        """The rows of the taxonomy its answers roll up through (inference.taxonomy), or []."""
        return (self.spec.get("answers") or {}).get("taxonomy") or []

    @property
    def label(self) -> str:
        """NAME@VERSION, as commands and exports name it; "" for a job whose pipeline has no
        name (removed, or the job was made without one)."""
        return f"{self.name}@{self.version}" if self.name else ""

    def model_names(self) -> str:
        """detector > filter > species classifier, in the order they run."""
        found = (self.detector, self.filter, self.classifier)
        return " > ".join(m.name for m in found if m is not None)


@dataclass(frozen=True)
class PipelineRow:
    """A row of `trapq pipelines`: a stored pipeline, its description and how many jobs use it."""

    pipeline: StoredPipeline
    description: str
    created_at: datetime
    jobs: int = 0
    active_jobs: int = 0


def detector_fingerprint(spec: dict[str, Any]) -> str:
    """What decides a job's boxes, hashed: its detector (where its file lay aside) and box
    threshold. Jobs with equal values may lend each other their boxes (db.reuse)."""
    detector = dict(spec.get("detector") or {})
    detector.pop("weights", None)
    threshold = spec.get("box_threshold")
    identity = {
        "detector": detector,
        "box_threshold": float(threshold) if threshold is not None else None,
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def job_pipeline(session: Session, job_id: int) -> StoredPipeline:
    """The pipeline job `job_id` runs; NoSuchJob if there is no such job."""
    found = job_pipelines(session, [job_id]).get(job_id)
    if found is None:
        raise NoSuchJob(job_id)
    return found


def job_pipelines(session: Session, job_ids: Sequence[int]) -> dict[int, StoredPipeline]:
    """The pipelines of these jobs (one query), by job id."""
    if not job_ids:
        return {}
    rows = session.execute(
        select(Job.id, Job.pipeline, Job.fingerprint, Pipeline.id, Pipeline.name, Pipeline.version)
        .outerjoin(Pipeline, Pipeline.id == Job.pipeline_id)
        .where(Job.id.in_(list(job_ids)))
    )
    return {
        job_id: StoredPipeline(fingerprint, spec, name, version, pid)
        for job_id, spec, fingerprint, pid, name, version in rows
    }


def add_pipeline(
    session: Session,
    name: str,
    spec: dict[str, Any],
    fingerprint: str,
    *,
    description: str = "",
    settings_key: str | None = None,
) -> tuple[StoredPipeline, bool]:
    """Record `spec` under `name`: (the pipeline, True) as the next version, or (the pipeline
    that has these contents already, False).

    Safe against others adding at the same moment: the insert runs in a savepoint, and one
    that loses the race for (name, version) or for the fingerprint reads again and takes the
    next version, or finds the contents the winner recorded. Contents recorded under another
    name are refused (one fingerprint, one pipeline), except for the settings' default, which
    takes whatever pipeline has its contents. The caller commits.
    """
    if not NAME.match(name):
        raise PipelineError(
            f"pipeline name {name!r}: use letters, digits, '.', '_' or '-' (at most 100)"
        )
    for _ in range(ADD_ATTEMPTS):
        same = session.scalar(select(Pipeline).where(Pipeline.fingerprint == fingerprint))
        if same is not None:
            if same.name != name and settings_key is None:
                raise PipelineError(
                    f"these contents are pipeline {same.name}@{same.version} already; "
                    f"enqueue with --pipeline {same.name}@{same.version}"
                )
            if settings_key is not None and same.settings_key is None:
                same.settings_key = settings_key
            return _stored(same), False
        latest = session.scalar(select(func.max(Pipeline.version)).where(Pipeline.name == name))
        row = Pipeline(
            name=name,
            version=(latest or 0) + 1,
            spec=spec,
            fingerprint=fingerprint,
            description=description,
            settings_key=settings_key,
        )
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError:
            continue
        return _stored(row), True
    raise PipelineError(
        f"pipeline {name!r} is being added by others at this moment; run the command again"
    )


def settings_pipeline(session: Session, settings_key: str) -> StoredPipeline | None:
    """The pipeline recorded from TRAPQ_* model settings with this key, if any."""
    row = session.scalar(
        select(Pipeline).where(Pipeline.settings_key == settings_key).order_by(Pipeline.id)
    )
    return None if row is None else _stored(row)


def find_pipeline(session: Session, ref: str) -> StoredPipeline:
    """NAME (its latest version) or NAME@VERSION; PipelineError names the known ones."""
    name, _, version = ref.partition("@")
    query = select(Pipeline).where(Pipeline.name == name)
    if version:
        if not version.isdigit():
            raise PipelineError(f"pipeline {ref!r}: the version after '@' is a number")
        query = query.where(Pipeline.version == int(version))
    row = session.scalar(query.order_by(Pipeline.version.desc()).limit(1))
    if row is None:
        known = [f"{n}@{v}" for n, v in session.execute(
            select(Pipeline.name, Pipeline.version).order_by(Pipeline.name, Pipeline.version)
        )]
        raise PipelineError(
            f"no pipeline {ref}; known: {', '.join(known) or 'none'} "
            "(`trapq pipelines add NAME` records one)"
        )
    return _stored(row)


def list_pipelines(session: Session) -> list[PipelineRow]:
    """Every pipeline, by name and version, with the jobs that use it (all, and not ended)."""
    ended = (JobState.DONE.value, JobState.FAILED.value)
    counts = {
        pid: (n, active)
        for pid, n, active in session.execute(
            select(
                Job.pipeline_id,
                func.count(),
                func.count().filter(Job.state.not_in(ended)),
            )
            .where(Job.pipeline_id.is_not(None))
            .group_by(Job.pipeline_id)
        )
    }
    rows = session.scalars(select(Pipeline).order_by(Pipeline.name, Pipeline.version))
    return [
        PipelineRow(_stored(r), r.description, r.created_at, *counts.get(r.id, (0, 0)))
        for r in rows
    ]


def remove_pipeline(session: Session, ref: str) -> list[str]:
    """Remove NAME (every version) or NAME@VERSION; refused while a job that has not ended
    uses one. Ended jobs keep their own copy of the spec. Returns the removed NAME@VERSIONs."""
    name, _, version = ref.partition("@")
    find_pipeline(session, ref)
    query = select(Pipeline).where(Pipeline.name == name)
    if version:
        query = query.where(Pipeline.version == int(version))
    rows = list(session.scalars(query.with_for_update()))
    ended = (JobState.DONE.value, JobState.FAILED.value)
    busy = list(session.scalars(
        select(Job.id).where(
            Job.pipeline_id.in_([r.id for r in rows]), Job.state.not_in(ended)
        ).order_by(Job.id)
    ))
    if busy:
        shown = ", ".join(str(j) for j in busy[:10]) + (" ..." if len(busy) > 10 else "")
        raise PipelineError(
            f"pipeline {ref} is used by jobs that have not ended ({shown}); "
            "wait for them or `trapq cancel` them first"
        )
    removed = [f"{r.name}@{r.version}" for r in rows]
    for r in rows:
        session.delete(r)
    return removed


def _stored(row: Pipeline) -> StoredPipeline:
    return StoredPipeline(row.fingerprint, row.spec, row.name, row.version, row.id)
