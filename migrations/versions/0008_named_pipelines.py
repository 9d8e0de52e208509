"""Named, versioned pipelines; jobs pin one (issue #22).

`pipelines` holds each name's versions (a spec and its fingerprint, unique); `jobs.pipeline_id`
points at the version a job runs, and `jobs.detector_fingerprint` (indexed with the deployment)
is what a re-classification job looks up to find an earlier job's boxes. Jobs enqueued before
this revision are given pipelines named `default`, one version per fingerprint, oldest first.

Revision ID: 0008
Revises: 0006
Create Date: 2026-12-04
"""

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
DEFAULT = "default"  # the name of the settings' pipeline


def detector_fingerprint(spec: dict[str, Any]) -> str:
    """db.pipelines.detector_fingerprint as this revision shipped it, kept here so that later
    changes to db/ cannot change what this revision writes."""
    detector = dict(spec.get("detector") or {})
    detector.pop("weights", None)
    threshold = spec.get("box_threshold")
    identity = {
        "detector": detector,
        "box_threshold": float(threshold) if threshold is not None else None,
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def upgrade() -> None:
    op.create_table(
        "pipelines",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False, server_default=""),
        sa.Column("settings_key", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("name", "version", name="uq_pipelines_name_version"),
        sa.UniqueConstraint("fingerprint", name="uq_pipelines_fingerprint"),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("pipeline_id", BigId, nullable=True))
        batch.add_column(sa.Column("detector_fingerprint", sa.String(64), nullable=True))
        batch.create_foreign_key(
            "fk_jobs_pipeline", "pipelines", ["pipeline_id"], ["id"], ondelete="SET NULL"
        )
        batch.create_index(
            "ix_jobs_deployment_detector", ["deployment_id", "detector_fingerprint"]
        )
    _name_existing_jobs()


def _name_existing_jobs() -> None:
    conn = op.get_bind()
    jobs = sa.table(
        "jobs",
        sa.column("id", BigId),
        sa.column("pipeline", sa.JSON()),
        sa.column("fingerprint", sa.String()),
        sa.column("pipeline_id", BigId),
        sa.column("detector_fingerprint", sa.String()),
    )
    pipelines = sa.table(
        "pipelines",
        sa.column("id", BigId),
        sa.column("name", sa.String()),
        sa.column("version", sa.Integer()),
        sa.column("spec", sa.JSON()),
        sa.column("fingerprint", sa.String()),
        sa.column("description", sa.Text()),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    ids: dict[str, int] = {}
    rows = conn.execute(
        sa.select(jobs.c.id, jobs.c.pipeline, jobs.c.fingerprint).order_by(jobs.c.id)
    ).all()
    for job_id, spec, fingerprint in rows:
        if fingerprint and fingerprint not in ids:
            ids[fingerprint] = conn.execute(
                sa.insert(pipelines)
                .values(name=DEFAULT, version=len(ids) + 1, spec=spec or {},
                        fingerprint=fingerprint, description="jobs enqueued before 0008",
                        created_at=datetime.now(UTC))
                .returning(pipelines.c.id)
            ).scalar_one()
        conn.execute(
            sa.update(jobs)
            .where(jobs.c.id == job_id)
            .values(pipeline_id=ids.get(fingerprint or ""),
                    detector_fingerprint=detector_fingerprint(spec or {}))
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_deployment_detector")
        batch.drop_constraint("fk_jobs_pipeline", type_="foreignkey")
        batch.drop_column("detector_fingerprint")
        batch.drop_column("pipeline_id")
    op.drop_table("pipelines")
