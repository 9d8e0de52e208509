"""Affinity: a chunk goes first to a worker that already holds its pipeline, by Celery routing.

Each pipeline has a queue of its own beside the common one (pipeline_queue). A worker that
runs a pipeline's first chunk starts consuming its queue (Celery's own add_consumer remote
control, sent to that worker alone) and keeps consuming it after an eviction: a chunk routed
there just before, or restored there by Redis after its worker died, must find a consumer
(tasks.worker.pipelines). The producer sends
a chunk to its pipeline's queue when some live worker consumes it (Celery's inspect
active_queues, asked at most once per AFFINITY_TTL_S), else to the common queue, which every
worker consumes: a worker that holds nothing useful takes any chunk and loads what it needs.

The Redis transport polls a worker's queues in sorted order (queue_order_strategy "sorted"),
and pipeline queues are named to sort before the common one, so a worker serves the pipelines
it holds before it takes a chunk that makes it load another.

Only the Redis broker routes so: the embedded broker has no broadcast, and sends every chunk
to the common queue.

A chunk restored to a pipeline queue after the only worker consuming it died waits until a
worker runs that pipeline again (its next chunk comes through the common queue); `trapq
requeue --stuck-after` sends it anew.
"""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery

log = logging.getLogger("trapq.routing")

AFFINITY_TTL_S = 5.0  # how long the producer trusts its answer of who consumes what
INSPECT_TIMEOUT_S = 0.5
QUEUE_ORDER = "sorted"  # Kombu's Redis queue_order_strategy: poll queues in name order
PREFIX = "+"  # sorts before letters and digits: pipeline queues come first in sorted order

_lock = threading.Lock()
_consumed: dict[str, tuple[float, frozenset[str]]] = {}  # broker URL -> (when, queues)


def pipeline_queue(base: str, fingerprint: str) -> str:
    """The queue of one pipeline's chunks, beside the common queue `base`."""
    return f"{PREFIX}{base}.{fingerprint[:16]}"


def lane_queue(base: str) -> str:
    """The fast lane's queue (tasks.fast_lane) beside the common queue `base`: every worker
    consumes it, and `!` sorts before `+` and letters, so a worker polls it first."""
    return f"!{base}.interactive"


def routes(broker_url: str) -> bool:
    return broker_url.startswith(("redis://", "rediss://"))


def consumed_queues(app: Celery) -> frozenset[str]:
    """The queues live workers consume now (cached for AFFINITY_TTL_S per broker)."""
    url = str(app.conf.broker_url)
    now = time.monotonic()
    with _lock:
        cached = _consumed.get(url)
        if cached is not None and now - cached[0] < AFFINITY_TTL_S:
            return cached[1]
    try:
        replies = app.control.inspect(timeout=INSPECT_TIMEOUT_S).active_queues() or {}
    except Exception as e:  # routing is an optimization: the common queue always works
        log.warning("cannot ask workers which queues they consume: %s", e)
        replies = {}
    queues = frozenset(q["name"] for qs in replies.values() for q in qs or () if "name" in q)
    with _lock:
        _consumed[url] = (now, queues)
    return queues


def forget_consumed() -> None:
    """Drop the cached answer (after workers changed what they consume, in tests and benches)."""
    with _lock:
        _consumed.clear()


def consume(app: Celery, worker: str, queue: str) -> None:
    """Tell one worker to consume `queue` (from any of its processes)."""
    app.control.add_consumer(queue, destination=[worker], reply=False)

