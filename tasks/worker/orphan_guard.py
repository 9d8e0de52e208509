"""A worker outlives no supervisor: `trapq worker`'s children stop when it dies.

Two layers, because either alone leaves a gap. In the child, between fork and exec, the
supervisor asks Linux for the warm-shutdown signal (SIGTERM) on its own death
(PR_SET_PDEATHSIG, kept across exec); if it died before that call, the child sees a parent
other than the supervisor and exits at once. In the Celery worker a watcher thread compares
the parent with TRAPQ_SUPERVISOR_PID once a POLL_S: it covers systems without prctl, and it
bounds the warm shutdown an orphan does: whoever watched the chunks is gone, so past
GRACE_S the orphan shuts down cold and its chunks go back to the queue (Kombu restores a
consumer's unacknowledged messages when it closes), to be delivered again to a supervised
worker that resumes them from their pending captures.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from celery import signals

from tasks.worker.exits import DEATH_SIGNAL, ORPHANED_EXIT, SUPERVISOR_PID_ENV

log = logging.getLogger("trapq.orphan_guard")

POLL_S = 0.5
GRACE_S = 7.0  # warm shutdown, then cold: every child is gone within 10 s of its supervisor


def supervisor_pid() -> int | None:
    value = os.environ.get(SUPERVISOR_PID_ENV, "")
    return int(value) if value.isdigit() else None


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_S)
    log.warning("supervisor (pid %d) is gone: warm shutdown, cold in %.0fs", parent_pid, GRACE_S)
    os.kill(os.getpid(), DEATH_SIGNAL)  # a no-op repeat if PR_SET_PDEATHSIG already sent it
    time.sleep(GRACE_S)
    log.warning("still running %.0fs after the supervisor died: cold shutdown, chunks in "
                "hand go back to the queue", GRACE_S)
    os.kill(os.getpid(), signal.SIGQUIT)


@signals.celeryd_after_setup.connect
def _start_watcher(**_: Any) -> None:
    # Runs in the worker's main process (the prefork parent included), the supervisor's child.
    parent = supervisor_pid()
    if parent is None:
        return  # not started by `trapq worker`: whoever started it supervises it
    if os.getppid() != parent:
        log.critical("started by supervisor pid %d, which is gone: exiting", parent)
        raise SystemExit(ORPHANED_EXIT)
    threading.Thread(target=_watch, args=(parent,), name="trapq-orphan-guard",
                     daemon=True).start()
