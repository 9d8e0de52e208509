"""Wake-ups from the job store: on PostgreSQL a trigger (migration 0009) sends NOTIFY on
CHANNEL whenever chunks are planned, end, or go back to pending. The dispatcher waits on it
for its next round, and a fast-lane caller for its job's end, instead of polling (which cost
`trapq classify` up to a poll interval per request, its largest step on short chunks).
SQLite has no NOTIFY: there the wait is the poll interval.
"""

from __future__ import annotations

import logging
import threading
import time

import psycopg
from sqlalchemy import Engine

log = logging.getLogger("trapq.wakeups")

CHANNEL = "trapq_dispatch"
STOP_CHECK_S = 1.0  # longest a wait goes without looking at `stop`


class Wakeup:
    """Waits for a NOTIFY on CHANNEL (PostgreSQL) or the poll interval, whichever is first."""

    def __init__(self, engine: Engine, poll_s: float) -> None:
        self.poll_s = poll_s
        self.conn: psycopg.Connection[object] | None = None
        # A connection of its own, outside the pool: LISTEN needs autocommit, which must not
        # follow a pooled connection back to the sessions.
        self.url = (
            engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
            if engine.dialect.name == "postgresql" else None
        )
        self._listen()

    def _listen(self) -> None:
        if self.url is None:
            return
        try:
            self.conn = psycopg.connect(self.url, autocommit=True)
            self.conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as e:  # the database is away: poll, and try again next time
            log.warning("cannot listen for dispatch wake-ups (%s); polling", e)
            self.close()

    def wait(self, stop: threading.Event) -> None:
        if self.url is None:
            stop.wait(self.poll_s)
            return
        if self.conn is None:  # lost: listen again, then return for a round at once, as
            self._listen()  # notifications sent meanwhile are gone
            if self.conn is None:
                stop.wait(self.poll_s)
            return
        deadline = time.monotonic() + self.poll_s
        try:  # in slices, so that a stop is seen within STOP_CHECK_S
            while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
                if any(True for _ in self.conn.notifies(timeout=min(left, STOP_CHECK_S),
                                                        stop_after=1)):
                    return
        except psycopg.Error as e:  # the connection broke: listen again at the next wait
            log.warning("dispatch wake-ups lost (%s); listening again", e)
            self.close()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
