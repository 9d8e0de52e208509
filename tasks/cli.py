"""Entry point of the `trapq` command: imports every command module, then runs the app.

Errors a user can hit end as one line (`UserError`, or a bad TRAPQ_* setting), never as a
traceback; the imports sit inside the guard because building the Celery app reads settings.
"""

from __future__ import annotations

from pydantic import ValidationError

from tasks.cli_app import fail, settings_problem
from tasks.errors import UserError

__all__ = ["main"]


def main() -> None:
    try:
        import tasks.commands  # noqa: F401  (registers the commands on the app)
        from tasks.cli_app import app

        app()
    except UserError as exc:
        fail(str(exc))
    except ValidationError as exc:
        fail(settings_problem(exc))
