"""A job's pipeline identified whole: jobs.fingerprint, the sha256 of its PipelineSpec.

Workers compare it with the spec they loaded (weights by their bytes, labels, thresholds) and
`enqueue --only-unprocessed` keys on it. Jobs enqueued before this revision have none (NULL).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("fingerprint", sa.String(length=64), nullable=True))
        batch_op.create_index("ix_jobs_fingerprint", ["fingerprint"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index("ix_jobs_fingerprint")
        batch_op.drop_column("fingerprint")
