"""Answers at the rank the evidence supports (issue #24).

classifications: `rank` of the answer (NULL without a taxonomy), `prediction_source` (how it
was reached: classifier, rolled-up, masked, masked-and-rolled-up; NULL before this revision,
when it was always the classifier's) and `probabilities`, the classifier's full softmax as
float16 (NULL where not stored), so another list or threshold can be re-applied without the
device. deployments: `taxa_list`, the entries of its species list (labels, taxon names or
GBIF keys) as given. projects: `species_threshold`, below which its answers roll up.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("classifications") as batch:
        batch.add_column(sa.Column("rank", sa.String(32), nullable=True))
        batch.add_column(sa.Column("prediction_source", sa.String(32), nullable=True))
        batch.add_column(sa.Column("probabilities", sa.LargeBinary(), nullable=True))
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("taxa_list", sa.JSON(), nullable=True))
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("species_threshold", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("species_threshold")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("taxa_list")
    with op.batch_alter_table("classifications") as batch:
        batch.drop_column("probabilities")
        batch.drop_column("prediction_source")
        batch.drop_column("rank")
