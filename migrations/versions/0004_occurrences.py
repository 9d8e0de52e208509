"""Occurrences: detections linked into individual insects, with the features that link them.

A moth that sits on the sheet for an hour is in every capture of that hour; abundance must
count it once (issue 16). Tracking links a night's detections into `occurrences` (job,
deployment, night, first/last capture and time, number of detections, label and score by a
score-weighted vote); each detection points at its occurrence, each link is kept with its cost
in `track_links` so doubtful links can be reviewed, and `jobs.tracked_at` says when the job
was last tracked. `detections.embedding` holds the classifier's penultimate features (float16
bytes) that the tracker compares; it stays NULL when TRAPQ_STORE_EMBEDDINGS is off.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "occurrences",
        sa.Column("id", BigId, nullable=False),
        sa.Column("job_id", BigId, nullable=False),
        sa.Column("deployment_id", BigId, nullable=False),
        sa.Column("night", sa.Date(), nullable=False),
        sa.Column("first_capture_id", BigId, nullable=False),
        sa.Column("last_capture_id", BigId, nullable=False),
        sa.Column("first_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("n_detections", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployments.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["first_capture_id"], ["captures.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["last_capture_id"], ["captures.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_occurrences_job_night", "occurrences", ["job_id", "night"])
    op.create_table(
        "track_links",
        sa.Column("detection_id", BigId, nullable=False),
        sa.Column("previous_detection_id", BigId, nullable=False),
        sa.Column("occurrence_id", BigId, nullable=False),
        sa.Column("cost", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["detection_id"], ["detections.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["previous_detection_id"], ["detections.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["occurrence_id"], ["occurrences.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("detection_id"),
    )
    op.create_index(
        "ix_track_links_occurrence_cost", "track_links", ["occurrence_id", "cost"]
    )
    with op.batch_alter_table("detections", schema=None) as batch_op:
        batch_op.add_column(sa.Column("embedding", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("occurrence_id", BigId, nullable=True))
        batch_op.create_foreign_key(
            "fk_detections_occurrence",
            "occurrences",
            ["occurrence_id"],
            ["id"],
            ondelete="SET NULL",
        )
        batch_op.create_index("ix_detections_occurrence", ["occurrence_id"], unique=False)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tracked_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("tracked_at")
    with op.batch_alter_table("detections", schema=None) as batch_op:
        batch_op.drop_index("ix_detections_occurrence")
        batch_op.drop_constraint("fk_detections_occurrence", type_="foreignkey")
        batch_op.drop_column("occurrence_id")
        batch_op.drop_column("embedding")
    op.drop_index("ix_track_links_occurrence_cost", table_name="track_links")
    op.drop_table("track_links")
    op.drop_index("ix_occurrences_job_night", table_name="occurrences")
    op.drop_table("occurrences")
