"""Where, when and how a deployment's camera worked: location, period, capture method, camera.

Camtrap DP requires a deployment's coordinates and period, and each media file's capture method
(activity detection or time lapse); exports read them from here. All nullable: deployments made
by `trapq import` get them later with `trapq deployments set`.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    ("location_id", sa.String(length=200)),
    ("location_name", sa.String(length=200)),
    ("latitude", sa.Float()),
    ("longitude", sa.Float()),
    ("coordinate_uncertainty_m", sa.Integer()),
    ("deployment_start", sa.DateTime(timezone=True)),
    ("deployment_end", sa.DateTime(timezone=True)),
    ("capture_method", sa.String(length=32)),
    ("camera_id", sa.String(length=200)),
    ("camera_model", sa.String(length=200)),
    ("camera_height_m", sa.Float()),
    ("setup_by", sa.String(length=200)),
    ("habitat", sa.Text()),
    ("comments", sa.Text()),
)


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch_op:
        for name, type_ in COLUMNS:
            batch_op.add_column(sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deployments") as batch_op:
        for name, _ in reversed(COLUMNS):
            batch_op.drop_column(name)
