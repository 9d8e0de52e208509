"""Projects with weights and caps; chunks released by the dispatcher (issue #23).

`projects` (name, weight, max_in_flight, and the start-time fair queueing tags vstart and
vfinish, see db.dispatch); `deployments.project_id` (NULL: the `default` project);
`jobs.project_id` (the project its deployment had when it was enqueued; existing jobs go to
`default`, created here) with the job's own tags; `chunks.released_at`, when its task id was
recorded (a chunk queued without `queued_at` is in doubt); an index to count chunks out.

On PostgreSQL a trigger sends NOTIFY trapq_dispatch when chunks are planned, end, or go back
to pending, so a dispatcher releases the next one at once instead of at its next poll.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

NOTIFY_FUNCTION = """
CREATE FUNCTION trapq_dispatch_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('trapq_dispatch', '');
    RETURN NULL;
END $$
"""
TRIGGERS = (
    "CREATE TRIGGER trapq_chunks_planned AFTER INSERT ON chunks "
    "FOR EACH STATEMENT EXECUTE FUNCTION trapq_dispatch_notify()",
    "CREATE TRIGGER trapq_chunks_freed AFTER UPDATE OF state ON chunks FOR EACH ROW "
    "WHEN (NEW.state IS DISTINCT FROM OLD.state "
    "AND NEW.state IN ('pending', 'done', 'failed', 'cancelled')) "
    "EXECUTE FUNCTION trapq_dispatch_notify()",
)


def upgrade() -> None:
    projects = op.create_table(
        "projects",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("max_in_flight", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("vstart", sa.Float(), nullable=False, server_default=sa.text("0")),
        sa.Column("vfinish", sa.Float(), nullable=False, server_default=sa.text("0")),
        sa.UniqueConstraint("name", name="uq_projects_name"),
    )
    op.bulk_insert(projects, [{"name": "default", "weight": 1.0,
                               "created_at": datetime.now(UTC)}])
    with op.batch_alter_table("deployments") as batch_op:
        batch_op.add_column(sa.Column("project_id", BigId, nullable=True))
        batch_op.create_foreign_key(
            "fk_deployments_project", "projects", ["project_id"], ["id"], ondelete="SET NULL"
        )
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("project_id", BigId, nullable=True))
        batch_op.add_column(
            sa.Column("vstart", sa.Float(), nullable=False, server_default=sa.text("0"))
        )
        batch_op.add_column(
            sa.Column("vfinish", sa.Float(), nullable=False, server_default=sa.text("0"))
        )
    op.execute(
        "UPDATE jobs SET project_id = (SELECT id FROM projects WHERE name = 'default')"
    )
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.alter_column("project_id", existing_type=BigId, nullable=False)
        batch_op.create_foreign_key("fk_jobs_project", "projects", ["project_id"], ["id"])
        batch_op.create_index("ix_jobs_project_state", ["project_id", "state"])
    with op.batch_alter_table("chunks") as batch_op:
        batch_op.add_column(sa.Column("released_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_chunks_state", ["state"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(NOTIFY_FUNCTION)
        for trigger in TRIGGERS:
            op.execute(trigger)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER trapq_chunks_freed ON chunks")
        op.execute("DROP TRIGGER trapq_chunks_planned ON chunks")
        op.execute("DROP FUNCTION trapq_dispatch_notify()")
    with op.batch_alter_table("chunks") as batch_op:
        batch_op.drop_index("ix_chunks_state")
        batch_op.drop_column("released_at")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index("ix_jobs_project_state")
        batch_op.drop_constraint("fk_jobs_project", type_="foreignkey")
        batch_op.drop_column("vfinish")
        batch_op.drop_column("vstart")
        batch_op.drop_column("project_id")
    with op.batch_alter_table("deployments") as batch_op:
        batch_op.drop_constraint("fk_deployments_project", type_="foreignkey")
        batch_op.drop_column("project_id")
    op.drop_table("projects")
