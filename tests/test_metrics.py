"""Worker metrics report the last window's rates from the engine's cumulative counters."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from inference.types import EngineStats
from tasks.worker.metrics import MetricsLogger
from tests.worker_process import wait_for

ZERO = EngineStats(0, 0, 0, 0, 0.0, 0.0, 0, 0, 0, 0, 0, 0, 16, 2**29)


class Counters:
    """Cumulative counters as inference.engine.Engine.stats() hands them out."""

    def __init__(self) -> None:
        self.now = ZERO

    def add(self, **delta: float) -> None:
        self.now = dataclasses.replace(
            self.now, **{k: getattr(self.now, k) + v for k, v in delta.items()}
        )

    def stats(self) -> EngineStats:
        return self.now


def test_each_sample_reports_only_the_window_since_the_previous_one() -> None:
    counters, now = Counters(), [100.0]
    metrics = MetricsLogger(counters.stats, 60, clock=lambda: now[0])

    counters.add(images=600, batches=80, crops=12_000, errors=3, busy_s=54.0)
    now[0] += 60
    first = metrics.sample()
    assert first.images_per_s == 10.0 and first.mean_batch_size == 7.5
    assert (first.crops, first.errors, first.gpu_busy_fraction) == (12_000, 3, 0.9)

    counters.add(images=120, batches=15, busy_s=15.0)
    now[0] += 30
    second = metrics.sample()
    assert second.gpu_busy_fraction == 0.5  # this window's busy time, not since start
    assert (second.images, second.images_per_s, second.mean_batch_size) == (120, 4.0, 8.0)
    assert (second.crops, second.errors) == (0, 0)


def test_an_idle_window_reports_zero_rather_than_dividing_by_zero() -> None:
    counters, now = Counters(), [0.0]
    metrics = MetricsLogger(counters.stats, 60, clock=lambda: now[0])
    now[0] += 60
    assert metrics.sample().mean_batch_size == 0.0


def test_the_logger_thread_logs_one_line_per_interval_each_about_its_own_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each interval the engine does 10 images and the clock moves 1 s: every line must say
    10 images/s over the last 1 s, i.e. one line per interval, none cumulative or merged."""
    counters, now = Counters(), [0.0]

    def stats() -> EngineStats:
        counters.add(images=10, batches=1)
        now[0] += 1.0
        return counters.stats()

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "images/s" in r.getMessage()]

    with caplog.at_level(logging.INFO, logger="trapq.metrics"):
        running = MetricsLogger(stats, interval_s=0.02, clock=lambda: now[0]).start()
        try:
            wait_for(lambda: len(lines()) >= 5, 30, "five metrics lines")
        finally:
            running.stop()
    assert lines() and all(
        line.startswith("worker metrics: 10.0 images/s, 1 batches of 10.0 images")
        and "in the last 1 s" in line for line in lines()
    ), lines()
