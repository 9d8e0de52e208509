"""Affinity: a chunk goes first to a worker that already holds its pipeline, by Celery routing.

Each pipeline has a queue of its own beside the common one (tasks.queues). A worker that
runs a pipeline's first chunk starts consuming its queue (Celery's own add_consumer remote
control, sent to that worker alone), and stops when it evicts the pipeline (cancel_consumer);
DRAIN_AFTER_S later, when the producer's answer of who consumes what has expired, it moves
whatever is left in that queue to the common one (Celery's contrib.migrate.move), unless it
holds the pipeline again by then (tasks.worker.pipelines). The producer sends a chunk to its
pipeline's queue when some live worker consumes it (Celery's inspect active_queues, asked
again in the background once AFFINITY_TTL_S old), else to the common queue, which every
worker consumes: a worker that holds nothing useful takes any chunk and loads what it needs.

The Redis transport polls a worker's queues in sorted order (queue_order_strategy "sorted"),
and pipeline queues are named to sort before the common one, so a worker serves the pipelines
it holds before it takes a chunk that makes it load another.

Only the Redis broker routes so: the embedded broker has no broadcast, and sends every chunk
to the common queue.

A message left in a pipeline queue that no live worker consumes (its only consumer died, and
the broker restored the message it held or had prefetched) is moved to the common queue by
the dispatcher (tasks.dispatcher, `waiting` and `drain` here); with no dispatcher running,
`trapq requeue --stuck-after` sends its chunk anew.
"""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery
from celery.contrib.migrate import move
from kombu import Exchange, Queue
from kombu.exceptions import ChannelError

log = logging.getLogger("trapq.routing")

AFFINITY_TTL_S = 5.0  # age at which the producer asks again who consumes what
INSPECT_TIMEOUT_S = 1.0  # a loaded machine's workers answer a broadcast within about this
# Oldest answer used while it is asked again: an ask waits out its timeout, plus connecting
# and collecting on a loaded machine (at 1 s more, rounds still waited on most asks).
STALE_FOR_S = AFFINITY_TTL_S + 3 * INSPECT_TIMEOUT_S
DRAIN_AFTER_S = STALE_FOR_S + 1.0  # after a cancel: no producer still routes there
QUEUE_ORDER = "sorted"  # Kombu's Redis queue_order_strategy: poll queues in name order

_lock = threading.Lock()
_consumed: dict[str, tuple[float, frozenset[str]]] = {}  # broker URL -> (when asked, queues)
_asking: set[str] = set()  # broker URLs asked again in the background now

def routes(broker_url: str) -> bool:
    return broker_url.startswith(("redis://", "rediss://"))


def consumed_queues(app: Celery) -> frozenset[str]:
    """The queues live workers consume now, per broker.

    An answer older than AFFINITY_TTL_S is asked again in a background thread while callers
    go on with it, until it is STALE_FOR_S old: a broadcast waits out its whole timeout, and a
    dispatcher round that waited for it left the slots without chunks for a second every few
    seconds (bench.fairness). Without an answer that young, the caller asks.
    """
    url = str(app.conf.broker_url)
    with _lock:
        cached = _consumed.get(url)
        age = time.monotonic() - cached[0] if cached is not None else STALE_FOR_S
        if cached is not None and age < STALE_FOR_S:
            if age >= AFFINITY_TTL_S and url not in _asking:
                _asking.add(url)
                threading.Thread(target=_ask, args=(app, url), name="trapq-routing-ask",
                                 daemon=True).start()
            return cached[1]
    return _ask(app, url)


def _ask(app: Celery, url: str) -> frozenset[str]:
    asked = time.monotonic()
    try:
        replies = app.control.inspect(timeout=INSPECT_TIMEOUT_S).active_queues() or {}
    except Exception as e:  # routing is an optimization: the common queue always works
        log.warning("cannot ask workers which queues they consume: %s", e)
        replies = {}
    queues = frozenset(q["name"] for qs in replies.values() for q in qs or () if "name" in q)
    with _lock:
        _consumed[url] = (asked, queues)
        _asking.discard(url)
    return queues


def forget_consumed() -> None:
    """Drop the cached answer (after workers changed what they consume, in tests and benches)."""
    with _lock:
        _consumed.clear()


def consume(app: Celery, worker: str, queue: str) -> None:
    """Tell one worker to consume `queue` (from any of its processes)."""
    app.control.add_consumer(queue, destination=[worker], reply=False)


def stop_consuming(app: Celery, worker: str, queue: str) -> None:
    app.control.cancel_consumer(queue, destination=[worker], reply=False)


def drain(app: Celery, queue: str, base: str) -> int:
    """Move the messages left in a pipeline queue to the common queue `base`; how many."""
    moved: list[str] = []
    move(
        lambda body, message: Queue(base, Exchange(base), routing_key=base),
        source=[queue],
        app=app,
        callback=lambda state, body, message: moved.append(message.delivery_tag),
    )
    return len(moved)


def waiting(app: Celery, queues: set[str]) -> set[str]:
    """Those of `queues` that hold messages (a passive declare: an empty queue is no key in
    Redis, and is not created by asking)."""
    found: set[str] = set()
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for queue in queues:
            try:
                if channel.queue_declare(queue=queue, passive=True).message_count:
                    found.add(queue)
            except ChannelError:  # no such queue: nothing in it
                pass
    return found
