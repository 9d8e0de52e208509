"""Entry point of the `trapq` command: imports every command module, then runs the app.

Errors a user can hit end as one line (`UserError`), never as a traceback.
"""

from __future__ import annotations

import tasks.commands  # noqa: F401  (registers the commands on the app)
from tasks.cli_app import UserError, app, fail

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except UserError as exc:
        fail(str(exc))
