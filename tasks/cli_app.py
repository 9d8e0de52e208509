"""The Typer app every command module registers on, the one-line error exit (tasks.errors),
and what every command needs: the settings, and timestamps parsed from options."""

from __future__ import annotations

from datetime import datetime
from typing import NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console

from tasks.errors import UserError
from tasks.settings import Settings, get_settings
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


def short_fingerprint(fingerprint: str | None) -> str:
    """Enough of a pipeline's fingerprint to tell pipelines apart at a glance, as git does."""
    return fingerprint[:10] if fingerprint else "-"
