"""When a killed worker's chunk comes back on Redis, and one visibility timeout per queue.

Kombu's Redis transport keeps each delivered, unacknowledged message in an `unacked` hash
with its delivery time. Any consumer sweeps that hash from time to time and puts back on its
queue every message older than *its own* visibility timeout. So:

- The worst case for a killed worker's chunk to be delivered again is the visibility
  timeout plus the sweep period, plus a poll of an idle worker (1 s). Kombu 5.7 sweeps on a
  10 s timer but scans Redis only on every 10th call (unacked_restore_interval *
  unacked_restore_throttle, kombu/transport/redis.py), i.e. every 100 s; trapq scans on
  every call of a TRAPQ_REDELIVERY_SWEEP_S timer: worst case TRAPQ_VISIBILITY_TIMEOUT_S +
  TRAPQ_REDELIVERY_SWEEP_S (10 s by default).
  A worker also sweeps as it starts, so a restarted one takes back what is due at once.
- The hash is one per Redis database by default, swept by every worker of every queue on
  it; trapq names it after the queue, so only the workers of one queue sweep its messages.
- Workers of one queue with different visibility timeouts deliver each other's chunks
  early (the shortest wins): tasks.worker.visibility_guard refuses to start such a worker.
"""

from __future__ import annotations

from typing import Any

from tasks.settings import Settings


def redis_broker_options(s: Settings) -> dict[str, Any]:
    """broker_transport_options of a Redis broker (see the module docstring)."""
    return {
        "visibility_timeout": s.visibility_timeout_s,
        "unacked_key": f"{s.queue}.unacked",
        "unacked_index_key": f"{s.queue}.unacked_index",
        "unacked_mutex_key": f"{s.queue}.unacked_mutex",
        "unacked_restore_interval": s.redelivery_sweep_s,
        "unacked_restore_throttle": 1,
    }


def worst_redelivery_s(s: Settings) -> int:
    """Longest wait for a killed worker's chunk to be handed out again on Redis."""
    return s.visibility_timeout_s + s.redelivery_sweep_s + 1
