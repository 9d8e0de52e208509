"""Everything that runs inside one Celery worker process, and `trapq worker`, which starts them.

Celery imports a worker's task and signal modules only when they are named in the app's
`include`; a module that connects a Celery signal but is not named there silently never runs.
CELERY_INCLUDE is that list: a new guard is one module here plus one line below
(tests/test_worker_layout.py fails when a signal-connecting module is missing from it).
"""

CELERY_INCLUDE: tuple[str, ...] = (
    "tasks.chunk",  # the chunk task
    "tasks.tracking",  # occurrences once a job ends
    "tasks.worker.boot",  # models once per process, memory guard, device faults
    "tasks.worker.chunk_watch",  # cold shutdown cuts running chunks short
    "tasks.worker.orphan_guard",  # no worker outlives its supervisor
    "tasks.worker.visibility_guard",  # one visibility timeout per queue
)
