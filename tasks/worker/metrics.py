"""Per-worker-process throughput, logged once a minute.

The engine keeps cumulative counters (inference.types.EngineStats); an operator needs the rate
*now* (is this GPU fed?), so a daemon thread samples them every interval and logs the
difference over the last window, one line. Nothing else reads these figures: a chunk row
stores what that chunk measured itself (inference.engine.Run.stats).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from inference.types import EngineStats

logger = logging.getLogger("trapq.metrics")


@dataclass(frozen=True)
class Window:
    """The engine's work between two samples."""

    seconds: float
    images: int
    batches: int
    crops: int
    errors: int
    busy_s: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def mean_batch_size(self) -> float:
        return self.images / self.batches if self.batches else 0.0

    @property
    def gpu_busy_fraction(self) -> float:
        return self.busy_s / self.seconds


def window(before: EngineStats, after: EngineStats, seconds: float) -> Window:
    return Window(
        seconds=max(seconds, 1e-9),
        images=after.images - before.images,
        batches=after.batches - before.batches,
        crops=after.crops - before.crops,
        errors=after.errors - before.errors,
        busy_s=after.busy_s - before.busy_s,
    )


class MetricsLogger:
    """A daemon thread that logs the engine's last window every `interval_s`."""

    def __init__(
        self,
        stats: Callable[[], EngineStats],
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        extra: Callable[[], str] = lambda: "",
    ) -> None:
        self._stats = stats
        self._clock = clock
        self._extra = extra  # appended to the line: the pipelines held (tasks.worker.pipelines)
        self.interval_s = interval_s
        self._last = (clock(), stats())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="trapq-metrics", daemon=True)

    def start(self) -> MetricsLogger:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> Window:
        """The window since the previous sample (or since start)."""
        now, stats = self._clock(), self._stats()
        then, before = self._last
        self._last = (now, stats)
        return window(before, stats, now - then)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                w = self.sample()
            except Exception:  # metrics must never take the worker down
                logger.exception("worker metrics: sampling the engine failed")
                continue
            extra = self._extra()
            logger.info(
                "worker metrics: %.1f images/s, %d batches of %.1f images on average, "
                "GPU busy %.0f%%, %d crops, %d errors in the last %.0f s%s",
                w.images_per_s, w.batches, w.mean_batch_size,
                100 * w.gpu_busy_fraction, w.crops, w.errors, w.seconds,
                f"; {extra}" if extra else "",
            )
