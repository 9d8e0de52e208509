"""Celery side of trapq: the app, the chunk task, worker start-up, producer and command line.

`celery -A tasks worker` finds the app here. It is built on first access, not at import, so
the `trapq` command can report a bad TRAPQ_* setting in one line instead of a traceback.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from tasks.celery_app import app

        return app
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")
