"""The Typer app every command module registers on, and the one-line error exit (tasks.errors)."""

from __future__ import annotations

from typing import NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console

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
