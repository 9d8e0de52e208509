"""job_captures: drop the foreign key to chunks too

Its row-by-row check still cost as much as the insert of a million work items. The producer
takes each chunk id from the chunks table in the same statement.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite's foreign keys have no names; batch mode names them by this convention to drop them.
SQLITE_NAMES = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}


def upgrade() -> None:
    doomed = [
        fk
        for fk in sa.inspect(op.get_bind()).get_foreign_keys("job_captures")
        if fk["referred_table"] == "chunks"
    ]
    with op.batch_alter_table("job_captures", naming_convention=SQLITE_NAMES) as batch:
        for fk in doomed:
            batch.drop_constraint(
                fk["name"] or "fk_job_captures_chunk_id_chunks", type_="foreignkey"
            )


def downgrade() -> None:
    with op.batch_alter_table("job_captures") as batch:
        batch.create_foreign_key(
            "job_captures_chunk_id_fkey", "chunks", ["chunk_id"], ["id"], ondelete="CASCADE"
        )
