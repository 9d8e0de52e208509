"""Every job records its pipeline: jobs.fingerprint and jobs.detector_fingerprint NOT NULL.

Jobs enqueued before revision 0002 recorded no pipeline (NULL fingerprint) and every reader
kept a branch for them. This revision refuses to run while such a job is in the store, naming
it: delete it first (`trapq delete JOB` with the trapq that serves the store now). jobs.pipeline
(the spec) is NOT NULL since 0001; jobs.pipeline_id stays nullable, as a removed pipeline
version leaves its ended jobs their own copy of the spec.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SHOWN = 20  # job ids named in the refusal


def upgrade() -> None:
    jobs = sa.table(
        "jobs", sa.column("id"), sa.column("fingerprint"), sa.column("detector_fingerprint")
    )
    bare = op.get_bind().scalars(
        sa.select(jobs.c.id)
        .where(sa.or_(jobs.c.fingerprint.is_(None), jobs.c.detector_fingerprint.is_(None)))
        .order_by(jobs.c.id)
        .limit(SHOWN + 1)
    ).all()
    if bare:
        shown = ", ".join(str(j) for j in bare[:SHOWN]) + (" ..." if len(bare) > SHOWN else "")
        raise RuntimeError(
            f"jobs {shown} record no pipeline (enqueued before revision 0002): delete them "
            "(`trapq delete JOB`) before upgrading to revision 0012"
        )
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("fingerprint", existing_type=sa.String(64), nullable=False)
        batch.alter_column("detector_fingerprint", existing_type=sa.String(64), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("fingerprint", existing_type=sa.String(64), nullable=True)
        batch.alter_column("detector_fingerprint", existing_type=sa.String(64), nullable=True)
