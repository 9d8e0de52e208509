"""Re-classification jobs: where a job's boxes come from, and which box a detection copies.

A job that only re-classifies reuses another job's detections instead of running the
detector (issue 14): `jobs.boxes_from_job_id` records that job, and each of its detections
keeps the box of the original one in `detections.source_detection_id`, so `trapq compare`
pairs them exactly and exports still read one job at a time. Both go NULL when the source
is deleted (the copies keep their own boxes). The index serves that SET NULL and the
comparison's join; on a large PostgreSQL table it is built while writes wait.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("boxes_from_job_id", BigId, nullable=True))
        batch_op.create_foreign_key(
            "fk_jobs_boxes_from_job", "jobs", ["boxes_from_job_id"], ["id"], ondelete="SET NULL"
        )
    with op.batch_alter_table("detections", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source_detection_id", BigId, nullable=True))
        batch_op.create_foreign_key(
            "fk_detections_source",
            "detections",
            ["source_detection_id"],
            ["id"],
            ondelete="SET NULL",
        )
        batch_op.create_index("ix_detections_source", ["source_detection_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("detections", schema=None) as batch_op:
        batch_op.drop_index("ix_detections_source")
        batch_op.drop_constraint("fk_detections_source", type_="foreignkey")
        batch_op.drop_column("source_detection_id")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint("fk_jobs_boxes_from_job", type_="foreignkey")
        batch_op.drop_column("boxes_from_job_id")
