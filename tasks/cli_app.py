"""The Typer app every command module registers on, and what every command shares: the
job store built once at the edge, errors as one line, timestamps parsed from options.

A command that touches the job store starts with `store = job_store()` and works through it,
the way a FastAPI route receives its session from a dependency instead of building one:

    @app.command()
    def show(job: Annotated[int, typer.Argument(help="Job id.")]) -> None:
        store = job_store()                  # settings -> checked schema -> sessions
        with store.read() as session:        # or store.write(): one transaction
            found = job_summary(session, job)  # db/ raises NoSuchJob for a missing job
        console.print(found)

Everything a user can get wrong ends as one `error:` line (user_message, used by tasks.cli):
a UserError raised anywhere, a bad TRAPQ_* setting, an unreachable database, and db.errors'
NoSuchJob / NoSuchDeployment, worded here once. Library code that takes a session factory
(exports, tracking, the producer) gets `store.sessions`, called inside `store.errors()`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from sqlalchemy.orm import Session, sessionmaker

from db.errors import NoSuchDeployment, NoSuchJob
from tasks.errors import UserError
from tasks.settings import Settings, get_settings
from tasks.store import database_errors, ready_session_factory
from tasks.timestamps import parse_timestamp

app = typer.Typer(
    name="trapq",
    help="Batched detection and classification of camera-trap captures on Celery GPU workers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise SystemExit(1)  # also outside a running Typer app (tasks.cli.main)


def settings_problem(error: ValidationError) -> str:
    """The first invalid TRAPQ_* setting, as one line."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    name = f"TRAPQ_{where.upper()}" if where else "a TRAPQ_* setting"
    return f"bad setting {name}: {first['msg']} (fix the environment variable or .env)"


def user_message(error: Exception) -> str:
    """The one line a user sees for an error of theirs (an instance of USER_ERRORS)."""
    if isinstance(error, ValidationError):
        return settings_problem(error)
    if isinstance(error, NoSuchJob):
        return f"{error}; `trapq status` lists jobs"
    if isinstance(error, NoSuchDeployment):
        return f"{error}; `trapq deployments` lists them"
    return str(error)


USER_ERRORS = (UserError, ValidationError, NoSuchJob, NoSuchDeployment)


@dataclass(frozen=True)
class JobStore:
    """The job store as a command uses it; build it with job_store()."""

    settings: Settings
    sessions: sessionmaker[Session]  # its database answered and its schema is at head

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for queries; database errors become one line."""
        with self.errors(), self.sessions() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One transaction, committed when the block ends; database errors become one line."""
        with self.errors(), self.sessions.begin() as session:
            yield session

    @contextmanager
    def errors(self) -> Iterator[None]:
        """For library calls that open their own sessions from `sessions`."""
        with database_errors(self.settings):
            yield


def job_store() -> JobStore:
    """Settings, then a session factory whose database answers with its schema at head."""
    s = settings()
    return JobStore(s, ready_session_factory(s))


def settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as e:
        raise UserError(settings_problem(e)) from None


def timestamp(text: str | None, option: str) -> datetime | None:
    if text is None:
        return None
    try:
        return parse_timestamp(text)
    except ValueError as e:
        raise UserError(f"{option}: {e}") from None


def short_fingerprint(fingerprint: str) -> str:
    """Enough of a pipeline's fingerprint to tell pipelines apart at a glance, as git does."""
    return fingerprint[:10]
