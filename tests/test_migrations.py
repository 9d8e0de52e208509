"""Alembic builds exactly the schema the models describe, on PostgreSQL and on SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

import migrations
from db.models import Base
from db.session import make_engine


def schema_differences(url: str) -> list[object]:
    engine = make_engine(url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    engine.dispose()
    return list(diff)


def tables(url: str) -> set[str]:
    engine = make_engine(url)
    with engine.connect() as conn:
        names = set(inspect(conn).get_table_names())
    engine.dispose()
    return names


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("empty_pg_url"))
    return f"sqlite:///{tmp_path / 'trapq.db'}"


def test_upgrade_head_on_an_empty_database_matches_the_models(empty_url: str) -> None:
    migrations.upgrade(empty_url)

    assert schema_differences(empty_url) == []
    assert set(Base.metadata.tables) <= tables(empty_url)


def test_downgrade_base_removes_every_table_and_upgrade_works_again(empty_url: str) -> None:
    migrations.upgrade(empty_url)

    migrations.downgrade(empty_url, "base")
    assert tables(empty_url) <= {"alembic_version"}

    migrations.upgrade(empty_url)
    assert schema_differences(empty_url) == []
