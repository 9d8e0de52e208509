"""Per-worker-process throughput, logged once a minute and handed to each chunk row.

The engine keeps cumulative counters; an operator needs the rate *now* (is this GPU fed?), so
the logger samples them on a timer and reports the difference over the last window.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

logger = logging.getLogger("trapq.metrics")

Stats = Mapping[str, Any]


class HasStats(Protocol):
    def stats(self) -> Stats: ...


class WorkerMetrics:
    """Figures over the window between two samples of the engine's cumulative counters."""

    def __init__(self, stats: Callable[[], Stats], clock: Callable[[], float] = time.monotonic):
        self._stats = stats
        self._clock = clock
        self._lock = threading.Lock()
        self._last = (clock(), stats())
        self._latest: dict[str, float] = {}

    def sample(self) -> dict[str, float]:
        """The window since the previous sample; also kept as `latest()`."""
        now, stats = self._clock(), self._stats()
        with self._lock:
            then, before = self._last
            self._last = (now, stats)
            window_s = max(now - then, 1e-9)
            images = stats["images"] - before["images"]
            batches = stats["batches"] - before["batches"]
            self._latest = {
                "window_s": round(window_s, 3),
                "images": images,
                "images_per_s": round(images / window_s, 3),
                "batches": batches,
                "mean_batch_size": round(images / batches, 3) if batches else 0.0,
                "crops": stats["crops"] - before["crops"],
                "errors": stats["errors"] - before["errors"],
                "gpu_busy_fraction": round((stats["busy_s"] - before["busy_s"]) / window_s, 4),
            }
            return dict(self._latest)

    def latest(self) -> dict[str, float]:
        """The last window's figures (empty before the first): what a chunk row stores."""
        with self._lock:
            return dict(self._latest)


class MetricsLogger:
    """A daemon thread that samples WorkerMetrics every `interval_s` and logs one line."""

    def __init__(self, metrics: WorkerMetrics, interval_s: float) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="trapq-metrics", daemon=True)

    def start(self) -> MetricsLogger:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def latest(self) -> dict[str, float]:
        return self.metrics.latest()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                m = self.metrics.sample()
            except Exception:  # metrics must never take the worker down
                logger.exception("worker metrics: sampling the engine failed")
                continue
            logger.info(
                "worker metrics: %.1f images/s, %d batches of %.1f images on average, "
                "GPU busy %.0f%%, %d crops, %d errors in the last %.0f s",
                m["images_per_s"], m["batches"], m["mean_batch_size"],
                100 * m["gpu_busy_fraction"], m["crops"], m["errors"], m["window_s"],
            )


def start_metrics_logger(engine: HasStats, interval_s: float = 60) -> MetricsLogger:
    """Start logging `engine`'s throughput every `interval_s`; call once per worker process,
    after the engine is built. `.latest()` is what each chunk stores in `chunks.metrics`."""
    return MetricsLogger(WorkerMetrics(engine.stats), interval_s).start()
