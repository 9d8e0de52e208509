"""The names of the queues beside the common one, in a module of their own: `trapq worker`'s
supervisor names a worker's queues without importing Celery's or Kombu's machinery
(tasks.routing sends and moves messages with them).

Kombu's Redis transport polls a worker's queues in sorted name order (tasks.routing), so the
first characters of these names decide what a worker serves first: the fast lane (`!`), then
the pipelines it holds (`+`), then the common queue.
"""

from __future__ import annotations

PIPELINE_PREFIX = "+"  # sorts before letters and digits: pipeline queues before the common one


def pipeline_queue(base: str, fingerprint: str) -> str:
    """The queue of one pipeline's chunks, beside the common queue `base`."""
    return f"{PIPELINE_PREFIX}{base}.{fingerprint[:16]}"


def lane_queue(base: str) -> str:
    """The fast lane's queue (tasks.fast_lane) beside the common queue `base`: every worker
    consumes it, and `!` sorts before `+` and letters, so a worker polls it first."""
    return f"!{base}.interactive"
