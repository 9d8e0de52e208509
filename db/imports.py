"""Recording captures: deployments by name and an idempotent bulk insert of capture rows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from typing import Any, TypedDict

from sqlalchemy import Insert, select
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
    """Insert rows in batches; a (deployment, uri) already recorded is skipped, not updated.

    Each batch is one multi-row INSERT ... ON CONFLICT DO NOTHING RETURNING id, so the count
    of added rows is exact even when another import runs at the same time.
    """
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
