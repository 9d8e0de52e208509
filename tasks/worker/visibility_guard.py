"""A worker refuses to start with another visibility timeout than the live workers of its queue.

Workers of one queue with different visibility timeouts deliver each other's chunks early:
each sweeps the queue's unacknowledged messages with its own timeout, and the shortest wins
(tasks.visibility). Each worker therefore leases a key `trapq:<queue>:visibility:<node>` on
the broker's Redis database, holding its timeout and refreshed while it lives; a worker whose
timeout differs from a live lease stops before loading its models, with a one-line reason
and exit LOAD_FAILED_EXIT (which `trapq worker` does not restart). A killed worker's lease
lapses after LEASE_S; then a new timeout is accepted.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from celery import signals
from celery.utils.nodenames import host_format

from tasks.settings import Settings, get_settings
from tasks.worker.exits import LOAD_FAILED_EXIT

log = logging.getLogger("trapq.visibility")

LEASE_S = 60
_REFRESH_S = LEASE_S / 4


def lease_key(queue: str, node: str = "*") -> str:
    return f"trapq:{queue}:visibility:{node}"


def conflicting_lease(client: redis.Redis, s: Settings, node: str) -> tuple[str, int] | None:
    """Another live worker of the queue with another visibility timeout: (its key, timeout)."""
    for key in client.scan_iter(match=lease_key(s.queue), count=1000):
        name = key.decode()
        if name == lease_key(s.queue, node):
            continue
        value = client.get(key)
        if value is not None and int(value) != s.visibility_timeout_s:
            return name, int(value)
    return None


class _Lease:
    def __init__(self, client: redis.Redis, key: str, timeout_s: int) -> None:
        self.client, self.key, self.timeout_s = client, key, timeout_s
        self.stopped = threading.Event()

    def refresh(self) -> None:
        while not self.stopped.wait(_REFRESH_S):
            try:
                self.client.set(self.key, self.timeout_s, ex=LEASE_S)
            except redis.exceptions.RedisError as e:  # the broker is down; the worker says so
                log.debug("visibility lease not refreshed: %s", e)

    def release(self) -> None:
        self.stopped.set()
        try:
            self.client.delete(self.key)
        except redis.exceptions.RedisError:
            pass  # it lapses by itself


_lease: _Lease | None = None


@signals.celeryd_init.connect
def _check_and_lease(sender: str | None = None, **_: Any) -> None:
    """Before the models load: refuse a visibility timeout that differs from a live worker's
    of the same queue, else lease ours."""
    global _lease
    s = get_settings()
    if not s.broker_url.startswith("redis"):
        return  # other brokers have no visibility timeout
    node = host_format(sender or "worker@%h")
    client = redis.Redis.from_url(s.broker_url, socket_timeout=10, socket_connect_timeout=10)
    try:
        conflict = conflicting_lease(client, s, node)
    except redis.exceptions.RedisError as e:
        log.warning("visibility timeout not checked against other workers: %s", e)
        return
    if conflict is not None:
        key, theirs = conflict
        log.critical(
            "TRAPQ_VISIBILITY_TIMEOUT_S=%d, but a live worker of queue %s uses %d (%s): "
            "workers with different timeouts deliver each other's chunks early; start this "
            "one with %d, or stop them first", s.visibility_timeout_s, s.queue, theirs, key,
            theirs,
        )
        raise SystemExit(LOAD_FAILED_EXIT)
    client.set(lease_key(s.queue, node), s.visibility_timeout_s, ex=LEASE_S)
    _lease = _Lease(client, lease_key(s.queue, node), s.visibility_timeout_s)
    threading.Thread(target=_lease.refresh, name="trapq-visibility-lease", daemon=True).start()


@signals.worker_shutdown.connect
def _release(**_: Any) -> None:
    if _lease is not None:
        _lease.release()
