"""Antenna tasks and their answers (issue #25).

`trapq antenna` takes tasks from Antenna and answers each exactly once across restarts of
any process, so what it took and what it answered lives in the job store: `antenna_tasks`
(one row per task: its reply subject and deadline, the trapq job and capture that answer it,
its state waiting/ready/posting/answered, the answer itself) and `antenna_images` (an Antenna
image id -> the capture made for it, so the same image is one capture whatever URL a task
gives for it).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "antenna_images",
        sa.Column("deployment_id", BigId, nullable=False),
        sa.Column("image_id", sa.String(length=200), nullable=False),
        sa.Column("capture_id", BigId, nullable=False),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployments.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["capture_id"], ["captures.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("deployment_id", "image_id"),
    )
    op.create_table(
        "antenna_tasks",
        sa.Column("id", BigId, nullable=False),
        sa.Column("antenna", sa.String(length=200), nullable=False),
        sa.Column("project_id", sa.BigInteger(), nullable=False),
        sa.Column("antenna_job_id", sa.BigInteger(), nullable=False),
        sa.Column("task_id", sa.String(length=200), nullable=False),
        sa.Column("image_id", sa.String(length=200), nullable=True),
        sa.Column("pipeline_slug", sa.String(length=200), nullable=False),
        sa.Column("reply_subject", sa.Text(), nullable=False),
        sa.Column("deliveries", sa.Integer(), nullable=False),
        sa.Column("first_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("job_id", BigId, nullable=True),
        sa.Column("capture_id", BigId, nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("answer", sa.JSON(), nullable=True),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("poster", sa.String(length=200), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="SET NULL",
                                name="fk_antenna_tasks_job"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("antenna", "antenna_job_id", "task_id",
                            name="uq_antenna_tasks_task"),
    )
    op.create_index("ix_antenna_tasks_state_deadline", "antenna_tasks", ["state", "deadline"])
    op.create_index("ix_antenna_tasks_job_capture", "antenna_tasks", ["job_id", "capture_id"])
    op.create_index("ix_antenna_tasks_ready_at", "antenna_tasks", ["ready_at"])


def downgrade() -> None:
    op.drop_index("ix_antenna_tasks_ready_at", table_name="antenna_tasks")
    op.drop_index("ix_antenna_tasks_job_capture", table_name="antenna_tasks")
    op.drop_index("ix_antenna_tasks_state_deadline", table_name="antenna_tasks")
    op.drop_table("antenna_tasks")
    op.drop_table("antenna_images")
