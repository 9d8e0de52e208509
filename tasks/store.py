"""The job store as seen from tasks/: one session factory per database URL, checked once.

Connection failures and a missing or outdated schema become one-line UserErrors that never
show a password. An embedded SQLite job store that has no schema yet is migrated on first
use, so a fresh machine's demo just works; a server database is only ever migrated by an
explicit `trapq db upgrade`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

import migrations
from db.session import make_engine, make_sessionmaker
from tasks.errors import UserError
from tasks.settings import Settings


def redact(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


@cache
def _factory(url: str) -> sessionmaker[Session]:
    return make_sessionmaker(make_engine(url))


def session_factory(settings: Settings) -> sessionmaker[Session]:
    """The process-wide session factory of settings.database_url (no schema check)."""
    return _factory(settings.database_url)


@contextmanager
def database_errors(settings: Settings) -> Iterator[None]:
    """Turn an unreachable or refusing database into a UserError naming the (redacted) URL."""
    with _database_errors(settings.database_url):
        yield


@contextmanager
def _database_errors(url: str) -> Iterator[None]:
    try:
        yield
    except (exc.OperationalError, exc.InterfaceError) as e:
        reason = str(e.orig or e).strip().splitlines()[0]
        raise UserError(
            f"cannot use the database at {redact(url)}: {reason} "
            "(check that it runs and TRAPQ_DATABASE_URL)"
        ) from None


def ready_session_factory(settings: Settings) -> sessionmaker[Session]:
    """The session factory, once the database answers and its schema is at head."""
    _check_schema(settings.database_url)
    return session_factory(settings)


@cache
def _check_schema(url: str) -> None:
    head = ScriptDirectory.from_config(migrations.alembic_config(url)).get_current_head()
    with _database_errors(url), _factory(url)() as session:
        current = MigrationContext.configure(session.connection()).get_current_revision()
    if current == head:
        return
    if current is None and make_url(url).get_backend_name() == "sqlite":
        migrations.upgrade(url)
        return
    state = "has no trapq schema" if current is None else f"is at revision {current}, not {head}"
    raise UserError(f"the database at {redact(url)} {state}; run `trapq db upgrade`")
