"""Recording captures: deployments by name and an idempotent bulk insert of capture rows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from typing import Any, TypedDict

from sqlalchemy import Insert, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import Capture, Deployment, utcnow

IMPORT_BATCH = 5000


class CaptureRow(TypedDict):
    uri: str
    captured_at: datetime | None
    width: int | None
    height: int | None


@dataclass(frozen=True)
class ImportCounts:
    added: int
    skipped: int


def find_deployment(session: Session, name: str) -> int | None:
    return session.scalar(select(Deployment.id).where(Deployment.name == name))


def get_or_create_deployment(session: Session, name: str) -> int:
    """Insert-if-missing by unique name, so two concurrent imports cannot both create it."""
    table = Deployment.__table__
    stmt = _insert_ignore(session, table).values(name=name, created_at=utcnow())
    session.connection().execute(stmt.on_conflict_do_nothing(index_elements=[table.c.name]))
    deployment_id = find_deployment(session, name)
    assert deployment_id is not None
    return deployment_id


def insert_captures(
    session: Session, deployment_id: int, rows: Iterable[CaptureRow], batch: int = IMPORT_BATCH
) -> ImportCounts:
    """Insert rows; a (deployment, uri) already recorded is skipped, not updated.

    The counts are exact even while another import runs: they come from what the
    INSERT ... ON CONFLICT DO NOTHING itself reports.
    """
    if session.get_bind().dialect.name == "postgresql":
        return _copy_captures(session, deployment_id, rows)
    table = Capture.__table__
    stmt = (
        _insert_ignore(session, table)
        .on_conflict_do_nothing(index_elements=[table.c.deployment_id, table.c.uri])
        .returning(table.c.id)
    )
    conn = session.connection()
    added = seen = 0
    for part in _batches(rows, batch):
        params = [{"deployment_id": deployment_id, **row} for row in part]
        added += len(conn.execute(stmt, params).all())
        seen += len(params)
    return ImportCounts(added=added, skipped=seen - added)


def _copy_captures(
    session: Session, deployment_id: int, rows: Iterable[CaptureRow]
) -> ImportCounts:
    """PostgreSQL: COPY the rows into a temporary table, then one INSERT ... SELECT.

    COPY streams (memory stays flat) and is several times faster than multi-row INSERTs.
    """
    conn = session.connection()
    conn.exec_driver_sql(
        "CREATE TEMPORARY TABLE IF NOT EXISTS capture_import "
        "(uri text, captured_at timestamptz, width integer, height integer) ON COMMIT DROP"
    )
    conn.exec_driver_sql("TRUNCATE capture_import")
    seen = 0
    with conn.connection.driver_connection.cursor() as cur:  # type: ignore[union-attr]
        with cur.copy("COPY capture_import (uri, captured_at, width, height) FROM STDIN") as copy:
            for row in rows:
                copy.write_row((row["uri"], row["captured_at"], row["width"], row["height"]))
                seen += 1
    added = conn.execute(
        text(
            "INSERT INTO captures (deployment_id, uri, captured_at, width, height) "
            "SELECT :deployment_id, uri, captured_at, width, height FROM capture_import "
            "ON CONFLICT (deployment_id, uri) DO NOTHING"
        ),
        {"deployment_id": deployment_id},
        execution_options={"preserve_rowcount": True},
    ).rowcount
    conn.exec_driver_sql("TRUNCATE capture_import")
    return ImportCounts(added=added, skipped=seen - added)


def _insert_ignore(session: Session, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    insert: Any = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)
    if insert is None:
        raise NotImplementedError(f"the job store supports PostgreSQL and SQLite, not {dialect}")
    stmt: Insert = insert(table)
    return stmt


def _batches(rows: Iterable[CaptureRow], size: int) -> Iterator[list[CaptureRow]]:
    it = iter(rows)
    while part := list(islice(it, size)):
        yield part
