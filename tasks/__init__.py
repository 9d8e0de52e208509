"""Celery side of trapq: the app, the chunk task, worker start-up, producer and command line.

`celery -A tasks worker` finds the app here.
"""

from tasks.celery_app import app

__all__ = ["app"]
