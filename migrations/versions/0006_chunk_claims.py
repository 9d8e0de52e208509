"""Claim tokens: a partitioned worker's late writes to a chunk it no longer holds are refused.

A worker cut off from the network keeps its chunk in hand; after the visibility timeout (or
`trapq requeue --stuck-after`) another worker claims and runs it, and when the link comes
back the first one may still write. `chunks.claim` counts every claim of the chunk and is
never reset (unlike attempts and deliveries, which a requeue zeroes): each delivery keeps
the value its claim set, and db.results refuses a write, heartbeat or chunk end whose token
is no longer the chunk's (a fencing token). Existing rows start at 0, as if never claimed.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("chunks", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("claim", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )


def downgrade() -> None:
    with op.batch_alter_table("chunks", schema=None) as batch_op:
        batch_op.drop_column("claim")
