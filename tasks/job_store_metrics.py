"""`trapq metrics`: the job store's figures that Flower cannot know, for Prometheus.

Per project: weight, captures and chunks pending, chunks in flight, captures done and share
of chunk time in the last hour against the weight share (db.project_status says how each is
computed). Per job that has not ended: chunks pending and in flight, captures done and left,
captures per second and ETA. And the dispatcher's base window: 2 x the live worker slots
(Celery's inspect, asked every few seconds in the background), at least
TRAPQ_DISPATCH_WINDOW_MIN; a running dispatcher adds what the pool consumes during a few of its
own rounds (tasks.dispatcher.window_for), which only it measures.

Read from SQL at a scrape, at most MAX_AGE_S old: scrapes closer together share one read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from db.project_status import ProjectFigures, project_figures
from tasks.dispatcher import SLOTS_EVERY_S, live_slots, window_for
from tasks.producer import producer_app
from tasks.settings import Settings
from tasks.store import ready_session_factory

MAX_AGE_S = 5.0

PROJECT_GAUGES = {
    "trapq_project_weight": ("Weight of the project.", "weight"),
    "trapq_project_captures_pending": (
        "Captures of its chunks not yet released.", "captures_pending"),
    "trapq_project_chunks_pending": ("Chunks waiting in SQL.", "chunks_pending"),
    "trapq_project_chunks_in_flight": (
        "Chunks queued on the broker or running.", "chunks_in_flight"),
    "trapq_project_captures_done_last_hour": (
        "Captures done in the last hour.", "captures_done_last_hour"),
    "trapq_project_gpu_share": (
        "Its share of all chunk seconds in the last hour.", "gpu_share"),
    "trapq_project_weight_share": (
        "Its weight over the weights of projects busy in the last hour.", "weight_share"),
}
JOB_GAUGES = {
    "trapq_job_chunks_pending": ("Chunks of the job waiting in SQL.", "chunks_pending"),
    "trapq_job_chunks_in_flight": ("Chunks of the job queued or running.", "chunks_in_flight"),
    "trapq_job_captures_done": ("Captures of the job done.", "done"),
    "trapq_job_captures_left": ("Captures of the job not ended.", "left"),
    "trapq_job_captures_per_second": (
        "Captures ended per second over the last ten minutes.", "captures_per_s"),
    "trapq_job_eta_seconds": ("Seconds until the job ends at its recent rate.", "eta_s"),
}
WINDOW = "trapq_dispatch_window"
EXPORTED = (*PROJECT_GAUGES, *JOB_GAUGES, WINDOW)


class JobStoreCollector(Collector):
    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.slots = 0
        self._lock = threading.Lock()
        self._read_at = 0.0
        self._figures: list[ProjectFigures] = []

    def figures(self) -> list[ProjectFigures]:
        with self._lock:
            if time.monotonic() - self._read_at >= MAX_AGE_S:
                with self.sessions() as session:
                    self._figures = project_figures(session, datetime.now(UTC))
                self._read_at = time.monotonic()
            return self._figures

    def collect(self) -> Iterator[GaugeMetricFamily]:
        figures = self.figures()
        for name, (doc, attr) in PROJECT_GAUGES.items():
            family = GaugeMetricFamily(name, doc, labels=["project"])
            for f in figures:
                family.add_metric([f.name], float(getattr(f, attr)))
            yield family
        for name, (doc, attr) in JOB_GAUGES.items():
            family = GaugeMetricFamily(name, doc, labels=["project", "job"])
            for f in figures:
                for job in f.jobs:
                    value = getattr(job, attr)
                    if value is not None:
                        family.add_metric([f.name, str(job.job_id)], float(value))
            yield family
        yield GaugeMetricFamily(
            WINDOW, "Chunks the dispatcher keeps out, before its own depth: 2 x live slots, "
            "at least the floor.",
            value=window_for(self.slots, self.settings.dispatch_window_min),
        )

    def watch_slots(self, stop: threading.Event) -> None:
        app = producer_app(self.settings)
        while not stop.is_set():
            try:
                self.slots = live_slots(app, self.settings.queue)
            except Exception:  # the window falls back to its floor while workers are away
                self.slots = 0
            stop.wait(SLOTS_EVERY_S)


def serve(settings: Settings, port: int, addr: str) -> None:
    """Serve /metrics until killed."""
    collector = JobStoreCollector(settings, ready_session_factory(settings))
    REGISTRY.register(collector)
    stop = threading.Event()
    threading.Thread(target=collector.watch_slots, args=(stop,), daemon=True).start()
    start_http_server(port, addr=addr)
    try:
        stop.wait()
    except KeyboardInterrupt:
        stop.set()
