"""A running chunk's heartbeat and deadline, kept by a timer thread, not by arriving results.

A thread beats every settings.heartbeat_s (the chunk row's heartbeat_at and live counts)
whatever the task thread is blocked on, so a chunk waiting on a hung fetch still looks alive
to `trapq requeue --stuck-after`; at the deadline, or when the row reads back anything but
`running` (cancelled), it interrupts the engine run the task thread iterates, which then
raises at once. The threads pool and solo ignore Celery's time limits; this deadline holds in
every pool.

A cold shutdown (a second Ctrl-C or SIGTERM to `trapq worker`, SIGQUIT) puts the chunks in
hand back on the queue, but the threads pool cannot stop a thread and waits for it: the
watch interrupts the run then too, so the chunk is cut short as a cold shutdown promises.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Protocol

from celery import platforms, signals

from db.states import ChunkState

log = logging.getLogger("trapq.chunk_watch")


class Interruptible(Protocol):
    def interrupt(self, error: BaseException) -> None: ...


class ChunkStopped(Exception):
    """Stop the run and write nothing more: the chunk row left `running` (cancelled), or the
    worker is shutting down cold (the row stays running; the chunk is delivered again)."""

    def __init__(self, state: str | None, why: str, *, requeue: bool = False) -> None:
        super().__init__(why)
        self.state = state
        self.requeue = requeue  # give the message back to the broker now


_cold = threading.Event()


@signals.worker_ready.connect
def _flag_cold_shutdown_first(**_: object) -> None:
    """Celery's cold-shutdown handler (SIGQUIT, which `trapq worker` forwards) stops the pool
    before it announces itself, and the threads pool waits for its running chunks there:
    the watches are told first, so they interrupt their runs."""
    celery_handler = platforms.signals["SIGQUIT"]

    def on_sigquit(signum: int, frame: FrameType | None) -> None:
        _cold.set()
        if callable(celery_handler):
            celery_handler(signum, frame)

    platforms.signals["SIGQUIT"] = on_sigquit


class ChunkWatch:
    """Beats `beat()` (returns the chunk's state) every `every_s` until closed; interrupts
    `run` with `expired()`'s error at `deadline` (time.monotonic()), or with ChunkStopped
    when a beat reads a state other than running."""

    def __init__(
        self,
        run: Interruptible,
        beat: Callable[[], str | None],
        *,
        every_s: float,
        deadline: float,
        expired: Callable[[], BaseException],
        name: str,
    ) -> None:
        self._run = run
        self._beat = beat
        self._every_s = every_s
        self._expired = expired
        self._closed = threading.Event()
        # Two threads: a beat that hangs on an unreachable database never delays the deadline.
        self._beats = threading.Thread(target=self._beat_loop, name=f"{name}-beat", daemon=True)
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._expire)
        self._timer.name = f"{name}-deadline"
        self._timer.daemon = True

    def __enter__(self) -> ChunkWatch:
        self._beats.start()
        self._timer.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closed.set()
        self._timer.cancel()

    def _expire(self) -> None:
        if not self._closed.is_set():
            self._run.interrupt(self._expired())

    def _beat_loop(self) -> None:
        while not self._closed.is_set():
            if _cold.wait(self._every_s):
                self._run.interrupt(ChunkStopped(
                    ChunkState.RUNNING.value, "cold shutdown: the chunk goes back to the queue",
                    requeue=True,
                ))
                return
            if self._closed.is_set():
                return
            try:
                state = self._beat()
            except Exception as e:  # the writes will meet the same outage and retry the chunk
                log.warning("heartbeat not recorded: %s", e)
                continue
            if state != ChunkState.RUNNING.value and not self._closed.is_set():
                self._run.interrupt(ChunkStopped(state, f"the chunk is {state}"))
                return
