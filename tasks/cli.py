"""Entry point of the `trapq` command: imports every command module, then runs the app.

Errors a user can hit end as one line (tasks.cli_app.USER_ERRORS), never as a traceback;
the imports sit inside the guard because building the Celery app reads settings.
"""

from __future__ import annotations

from tasks.cli_app import USER_ERRORS, fail, user_message

__all__ = ["main"]


def main() -> None:
    try:
        import tasks.commands  # noqa: F401  (registers the commands on the app)
        from tasks.cli_app import app

        app()
    except USER_ERRORS as exc:
        fail(user_message(exc))
