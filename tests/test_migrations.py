"""Alembic builds exactly the schema the models describe, on PostgreSQL and on SQLite, and
revisions with a data step treat the rows already there as they say."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import exc, inspect, text

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


def _execute(url: str, sql: str, **params: object) -> list[object]:
    engine = make_engine(url)
    with engine.begin() as conn:
        result = conn.execute(text(sql), params)
        rows = list(result.scalars()) if result.returns_rows else []
    engine.dispose()
    return rows


# A job row as revision 0011 allows it (fingerprint NULL: enqueued before revision 0002).
INSERT_JOB = (
    "INSERT INTO jobs (deployment_id, state, pipeline, fingerprint, detector_fingerprint, "
    "chunk_size, n_captures, n_chunks, created_at, project_id) "
    "SELECT d.id, 'done', '{}', :fp, :fp, 1, 0, 0, CURRENT_TIMESTAMP, p.id "
    "FROM deployments d, projects p WHERE p.name = 'default'"
)


def test_0012_refuses_a_job_without_a_pipeline_naming_it_then_requires_one(
    empty_url: str,
) -> None:
    migrations.downgrade(empty_url, "base")  # the session's PostgreSQL database is shared
    migrations.upgrade(empty_url, "0011")
    _execute(empty_url,
             "INSERT INTO deployments (name, created_at) VALUES ('d', CURRENT_TIMESTAMP)")
    _execute(empty_url, INSERT_JOB, fp="ab" * 32)
    _execute(empty_url, INSERT_JOB, fp=None)
    bare = _execute(empty_url, "SELECT max(id) FROM jobs")[0]

    with pytest.raises(RuntimeError, match=rf"jobs {bare} record no pipeline .*trapq delete"):
        migrations.upgrade(empty_url)
    _execute(empty_url, "DELETE FROM jobs WHERE id = :id", id=bare)
    migrations.upgrade(empty_url)
    assert schema_differences(empty_url) == []
    with pytest.raises(exc.IntegrityError):
        _execute(empty_url, INSERT_JOB, fp=None)

    migrations.downgrade(empty_url, "0011")
    _execute(empty_url, INSERT_JOB, fp=None)
    assert _execute(empty_url, "SELECT count(*) FROM jobs") == [2]
    _execute(empty_url, "DELETE FROM jobs")
    migrations.downgrade(empty_url, "base")
