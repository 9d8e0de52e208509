"""job_captures: drop the foreign keys to jobs and captures

PostgreSQL checks a foreign key row by row; on the million work items of one enqueue the
two checks (and the row lock each takes on a capture) cost more than the insert itself.
The producer takes both ids from their tables in the same statement, and deleting a job
still cascades to its work items through chunk_id.

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite's foreign keys have no names; batch mode names them by this convention to drop them.
SQLITE_NAMES = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}


def upgrade() -> None:
    doomed = [
        fk
        for fk in sa.inspect(op.get_bind()).get_foreign_keys("job_captures")
        if fk["referred_table"] in ("jobs", "captures")
    ]
    with op.batch_alter_table("job_captures", naming_convention=SQLITE_NAMES) as batch:
        for fk in doomed:
            column, table = fk["constrained_columns"][0], fk["referred_table"]
            batch.drop_constraint(
                fk["name"] or f"fk_job_captures_{column}_{table}", type_="foreignkey"
            )


def downgrade() -> None:
    with op.batch_alter_table("job_captures") as batch:
        batch.create_foreign_key(
            "job_captures_job_id_fkey", "jobs", ["job_id"], ["id"], ondelete="CASCADE"
        )
        batch.create_foreign_key(
            "job_captures_capture_id_fkey", "captures", ["capture_id"], ["id"], ondelete="CASCADE"
        )
