"""The dispatcher: keeps a shallow window of chunk messages on the broker, the rest in SQL.

`trapq enqueue` leaves a job's chunks `pending`. The dispatcher releases them in fair order
(db.dispatch) whenever fewer than the window are out (queued or running). The window is twice
the live worker slots (Celery's inspect: the workers consuming the chunk queue and their pool
sizes), never fewer than TRAPQ_DISPATCH_WINDOW_MIN, so each slot has a chunk running and one
waiting; plus what the pool consumes while a replacement is on its way. A chunk that ends just
after a round began waits for the next round, so a slot's next chunk must already be queued for
up to two rounds: with chunks shorter than that (0.1 s chunks against 50 ms rounds on a loaded
box, bench.fairness) a window of 2 x slots ran dry and left a third of the slots idle. So the
window also holds DEPTH_ROUNDS rounds' worth of the measured release rate, which is bounded in
time (a late small job waits about that long for its first chunk), not in chunks.
Released chunks are ordinary chunk tasks sent by tasks.producer.

It wakes when a chunk ends, a job is planned or a chunk goes back to pending: on PostgreSQL a
trigger (migration 0009) sends NOTIFY on the `trapq_dispatch` channel, and the dispatcher
LISTENs; otherwise (SQLite, a missed notification) it polls every TRAPQ_DISPATCH_POLL_S. A
LISTEN connection that breaks (PostgreSQL restarted, the backend terminated) is opened again
at the next wait, followed by a round for what was missed meanwhile.
Any number may run at once (`trapq dispatch`, `trapq worker`, `trapq demo`): a round locks
every project row first, so they take turns, and each chunk is released once.

It also looks, every STRAYS_EVERY_S, for messages of chunks out left in a pipeline queue that
no live worker consumes (the only consumer died and the broker restored what it held): a
queue found so at two looks in a row (the workers' answer of who consumes what is fresh by
the second) is moved to the common queue, so a killed worker's chunk runs again whoever
holds its pipeline now.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from db.dispatch import DISPATCHER_SESSION, fingerprints_out, recover_in_doubt, release
from tasks import routing
from tasks.producer import producer_app, send_assigned
from tasks.queues import pipeline_queue
from tasks.settings import Settings, get_settings
from tasks.store import ready_session_factory
from tasks.wakeups import Wakeup

log = logging.getLogger("trapq.dispatcher")

SLOTS_EVERY_S = 10.0  # how often live worker slots are asked for (a broadcast costs ~1 s)
INSPECT_TIMEOUT_S = 1.0
DEPTH_ROUNDS = 4  # a replacement takes up to two rounds; twice that against jitter
RATE_SPAN_S = 10.0  # the release rate is the chunks released over this span
ROUND_EWMA = 0.2  # weight of the newest round in the round-time average
STRAYS_EVERY_S = 10.0  # longer than routing's answer may be old (so the second look is fresh)


def live_slots(app: Celery, queue: str) -> int:
    """Pool slots of the live workers that consume `queue` (or one of its lanes)."""
    inspect = app.control.inspect(timeout=INSPECT_TIMEOUT_S)
    queues = inspect.active_queues() or {}
    stats = inspect.stats() or {}
    total = 0
    for node, consumed in queues.items():
        names = {q.get("name", "") for q in consumed}
        if any(n == queue or n.startswith(f"{queue}.") for n in names):
            total += int(stats.get(node, {}).get("pool", {}).get("max-concurrency", 0))
    return total


def window_for(slots: int, floor: int, rate: float = 0.0, round_s: float = 0.0) -> int:
    """Chunks out at once: a running and a waiting one per slot, plus what the pool consumes
    (`rate` chunks/s) during DEPTH_ROUNDS rounds of `round_s`."""
    return max(floor, 2 * slots) + math.ceil(rate * DEPTH_ROUNDS * round_s)


def interactive_cap(slots: int, share: float) -> int:
    """Fast-lane chunks out at once: the share of the slots, at least one (else the lane
    would never run while batch work fills the pool)."""
    return max(1, int(slots * share))


@dataclass
class Dispatcher:
    settings: Settings
    sessions: sessionmaker[Session]
    app: Celery  # one producer app (and its broker connections) for every round
    slots: int = 0
    rounds: int = 0
    released: int = 0
    recovered: int = 0
    round_s: float = 0.0  # releasing rounds' duration (start to published), moving average
    recent: deque[tuple[float, int]] = field(default_factory=deque)  # (when, released)
    stop: threading.Event = field(default_factory=threading.Event)
    on_round: Callable[[int], None] | None = None  # released in that round (tests, metrics)

    @classmethod
    def build(cls, settings: Settings) -> Dispatcher:
        return cls(settings, ready_session_factory(settings), producer_app(settings))

    @property
    def window(self) -> int:
        return window_for(self.slots, self.settings.dispatch_window_min, self.rate,
                          self.round_s)

    @property
    def rate(self) -> float:
        """Chunks released per second over the last RATE_SPAN_S: while work waits, what the
        pool consumes."""
        horizon = time.monotonic() - RATE_SPAN_S
        while self.recent and self.recent[0][0] < horizon:
            self.recent.popleft()
        return sum(n for _, n in self.recent) / RATE_SPAN_S

    def round(self) -> int:
        """A timed release round (see window_for); returns how many chunks went out."""
        t0 = time.monotonic()
        sent = self._release()
        if sent:  # a round that publishes is what a slot's replacement waits for
            now = time.monotonic()
            self.round_s += ROUND_EWMA * (now - t0 - self.round_s)
            self.recent.append((now, sent))
        return sent

    def _release(self) -> int:
        """Put chunks in doubt back to pending, release what fits, publish it."""
        s = self.settings
        now = datetime.now(UTC)
        with self.sessions.begin() as session:
            recovered = recover_in_doubt(session, now, timedelta(seconds=s.dispatch_in_doubt_s))
            chosen = release(
                session, self.window, now, interactive_cap(self.slots, s.interactive_share)
            )
        if recovered:
            log.warning("%d chunk(s) in doubt (their sender died) are pending again", recovered)
        self.recovered += recovered
        self.rounds += 1
        if not chosen.assigned:
            return 0
        result = send_assigned(s, self.sessions, chosen.assigned, self.app)
        self.released += result.sent
        if result.failed:
            log.warning("%d chunk(s) not sent (%s); they stay pending", result.failed,
                        result.error)
        log.info("released %d chunk(s) %s", result.sent, chosen.by_project)
        if self.on_round is not None:
            self.on_round(result.sent)
        return result.sent

    def run(self) -> None:
        """Rounds until `stop` is set: at each wake-up, and at least every poll interval."""
        slots_thread = threading.Thread(
            target=self._watch_slots, name="trapq-dispatch-slots", daemon=True
        )
        slots_thread.start()
        if self.settings.affinity and routing.routes(self.settings.broker_url):
            threading.Thread(
                target=self._watch_strays, name="trapq-dispatch-strays", daemon=True
            ).start()
        wake = Wakeup(self.sessions.kw["bind"], self.settings.dispatch_poll_s)
        try:
            while not self.stop.is_set():
                try:  # one round per wake-up: chunks that end during it wake the next at once
                    self.round()
                except Exception as e:  # the database or broker is away: try again later
                    log.warning("dispatch round failed: %s", e)
                    self.stop.wait(self.settings.dispatch_poll_s)
                wake.wait(self.stop)
        finally:
            wake.close()
            self.stop.set()

    def _watch_slots(self) -> None:
        while not self.stop.is_set():
            try:
                self.slots = live_slots(self.app, self.settings.queue)
            except Exception as e:
                log.warning("cannot count live worker slots: %s", e)
            self.stop.wait(SLOTS_EVERY_S)

    def _watch_strays(self) -> None:
        seen: set[str] = set()
        while not self.stop.wait(STRAYS_EVERY_S):
            try:
                seen = self.move_strays(seen)
            except Exception as e:
                log.warning("cannot look for messages no worker consumes: %s", e)

    def move_strays(self, seen: set[str]) -> set[str]:
        """Move to the common queue the pipeline queues found unconsumed with messages now and
        in `seen` (the previous look); returns what this look found."""
        base = self.settings.queue
        with self.sessions() as session:
            queues = {pipeline_queue(base, fp) for fp in fingerprints_out(session)}
        stray = routing.waiting(self.app, queues - routing.consumed_queues(self.app))
        for queue in stray & seen:
            moved = routing.drain(self.app, queue, base)
            log.warning("moved %d message(s) from %s, which no live worker consumes, to %s",
                        moved, queue, base)
        return stray


def run_in_thread(settings: Settings) -> tuple[Dispatcher, threading.Thread]:
    """A dispatcher running beside something else (the demo); set `.stop` to end it."""
    dispatcher = Dispatcher.build(settings)
    thread = threading.Thread(target=dispatcher.run, name="trapq-dispatcher", daemon=True)
    thread.start()
    return dispatcher, thread


def main_loop(settings: Settings) -> None:
    """`trapq dispatch`: run until killed or Ctrl-C (a kill at any point loses nothing)."""
    os.environ["PGAPPNAME"] = DISPATCHER_SESSION  # enqueue looks for it
    logging.basicConfig(level=logging.INFO,
                        format="[%(asctime)s: %(levelname)s/dispatch] %(message)s")
    dispatcher = Dispatcher.build(settings)
    log.info("dispatching (window at least %d, poll %.1fs)", settings.dispatch_window_min,
             settings.dispatch_poll_s)
    try:
        dispatcher.run()
    except KeyboardInterrupt:
        dispatcher.stop.set()


if __name__ == "__main__":  # `python -m tasks.dispatcher`, as `trapq worker` starts it
    main_loop(get_settings())
