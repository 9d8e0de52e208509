"""Worker metrics report the last window's rates from the engine's cumulative counters."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from tasks.metrics import WorkerMetrics, start_metrics_logger


class Counters:
    """Cumulative counters shaped like inference.engine.Engine.stats()."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = dict(
            images=0, batches=0, crops=0, errors=0, busy_s=0.0
        )

    def add(self, **delta: float) -> None:
        for key, value in delta.items():
            self.values[key] += value

    def stats(self) -> dict[str, Any]:
        return dict(self.values)


def test_each_sample_reports_only_the_window_since_the_previous_one() -> None:
    counters, now = Counters(), [100.0]
    metrics = WorkerMetrics(counters.stats, clock=lambda: now[0])
    assert metrics.latest() == {}

    counters.add(images=600, batches=80, crops=12_000, errors=3, busy_s=54.0)
    now[0] += 60
    first = metrics.sample()
    assert first["images_per_s"] == 10.0
    assert first["mean_batch_size"] == 7.5
    assert (first["crops"], first["errors"], first["gpu_busy_fraction"]) == (12_000, 3, 0.9)

    counters.add(images=120, batches=15, busy_s=15.0)
    now[0] += 30
    second = metrics.sample()
    assert second["gpu_busy_fraction"] == 0.5  # this window's busy time, not since start
    assert (second["images"], second["images_per_s"], second["mean_batch_size"]) == (120, 4.0, 8.0)
    assert (second["crops"], second["errors"]) == (0, 0)
    assert metrics.latest() == second


def test_an_idle_window_reports_zero_rather_than_dividing_by_zero() -> None:
    counters, now = Counters(), [0.0]
    metrics = WorkerMetrics(counters.stats, clock=lambda: now[0])
    now[0] += 60
    assert metrics.sample()["mean_batch_size"] == 0.0


def test_the_logger_thread_logs_a_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    counters = Counters()
    with caplog.at_level(logging.INFO, logger="trapq.metrics"):
        running = start_metrics_logger(counters, interval_s=0.05)
        try:
            for _ in range(200):
                if running.latest():
                    break
                time.sleep(0.05)
        finally:
            running.stop()
    assert running.latest()["images_per_s"] == 0.0
    assert any("images/s" in r.getMessage() for r in caplog.records)
