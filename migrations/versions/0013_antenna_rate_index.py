"""Index on chunks.finished_at (issue #25).

The Antenna bridge measures the pool's rate every round from the chunks that finished within
its horizon (db.antenna.load); without an index that is a scan of every chunk ever run, which
grows with the job store's history while the answer it gives stays a few rows.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_chunks_finished_at", "chunks", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_chunks_finished_at", table_name="chunks")
