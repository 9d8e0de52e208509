"""The worker's pipelines: a chunk's job names its stored pipeline, the model cache holds it.

The glue between the pure-torch model cache (inference.model_cache) and the rest of the
worker: the job's spec comes from the job store (db.pipelines.StoredPipeline), a pipeline that
cannot load becomes the chunk's failure, and the first chunk of a pipeline starts this worker
consuming that pipeline's queue (tasks.routing); evicting it stops that, and what the producer
routed there meanwhile is moved to the common queue once no producer routes there any more.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from celery import Celery

from db.pipelines import StoredPipeline
from inference.model_cache import CachedPipeline, ModelCache, PipelineLoadError
from inference.pipeline_spec import PipelineSpec
from tasks import routing
from tasks.queues import pipeline_queue

if TYPE_CHECKING:
    import torch

    from inference.forward import BatchForward
    from inference.registry import Pipeline

log = logging.getLogger("trapq.worker")


class PipelineUnavailable(Exception):
    """The job's pipeline cannot be loaded here (weights missing, changed or unreachable, wrong
    shapes, too big for the cache): its chunks fail with the reason, the worker goes on."""


class WorkerPipelines:
    """One per worker process, beside its engine."""

    def __init__(
        self,
        app: Celery,
        base_queue: str,
        *,
        device: torch.device,
        precision: str,
        bound_bytes: int,
        prepare: Callable[[Pipeline], BatchForward],
        weights_cache_dir: Path,
        affinity: bool = True,
    ) -> None:
        self.cache = ModelCache(
            device, precision, bound_bytes, prepare, weights_cache_dir=weights_cache_dir,
            on_load=self.loaded, on_evict=self.evicted,
        )
        self._app = app
        self._base_queue = base_queue
        self._routes = affinity and routing.routes(str(app.conf.broker_url))
        self._lock = threading.Lock()
        self._consuming: dict[str, str] = {}  # fingerprint -> worker told to consume its queue

    def adopt(self, pipeline: Pipeline, forward: BatchForward) -> None:
        """The worker's own TRAPQ_* pipeline, loaded at start: the cache's first entry."""
        self.cache.adopt(pipeline, forward, "the TRAPQ_* settings")

    @contextmanager
    def use(self, stored: StoredPipeline, worker: str) -> Iterator[CachedPipeline]:
        """The job's pipeline, loaded and prepared, held while the block runs."""
        try:
            entry = self.cache.acquire(
                lambda: PipelineSpec.from_dict(stored.spec),
                stored.fingerprint,
                stored.label or stored.fingerprint[:12],
            )
        except PipelineLoadError as e:
            raise PipelineUnavailable(str(e)) from None
        try:
            self._consume(entry.fingerprint, worker)
            yield entry
        finally:
            self.cache.release(entry)

    def evicted(self, entry: CachedPipeline) -> None:
        """The cache's on_evict: this worker stops taking that pipeline's chunks first."""
        log.info("pipeline %s (%s) evicted from the model cache", entry.name,
                 entry.fingerprint[:12])
        with self._lock:
            worker = self._consuming.pop(entry.fingerprint, None)
        if worker is None:
            return
        queue = pipeline_queue(self._base_queue, entry.fingerprint)
        try:
            routing.stop_consuming(self._app, worker, queue)
        except Exception as e:
            log.warning("could not stop consuming %s: %s", queue, e)
        drain = threading.Timer(routing.DRAIN_AFTER_S, self._drain, (entry.fingerprint, queue))
        drain.daemon = True
        drain.start()

    def _drain(self, fingerprint: str, queue: str) -> None:
        """Chunks left in an evicted pipeline's queue go to the common one, unless this worker
        consumes that queue again by now."""
        with self._lock:
            if fingerprint in self._consuming:
                return
        try:
            moved = routing.drain(self._app, queue, self._base_queue)
        except Exception as e:  # they wait for the next worker that loads the pipeline
            log.warning("could not move the chunks left in %s: %s", queue, e)
            return
        if moved:
            log.info("%d chunks left in %s moved to %s", moved, queue, self._base_queue)

    def loaded(self, entry: CachedPipeline) -> None:
        log.info("pipeline %s (%s) loaded into the model cache", entry.name,
                 entry.fingerprint[:12])

    def summary(self) -> str:
        """For the metrics line: what is held, and the loads and evictions of the last minute."""
        held = ", ".join(e.name for e in self.cache.held()) or "none"
        recent = self.cache.recent()
        return (
            f"pipelines held: {held} ({self.cache.nbytes() / 2**20:.0f} MiB); "
            f"{recent.loads} loads, {recent.evictions} evictions in the last minute"
        )

    def _consume(self, fingerprint: str, worker: str) -> None:
        if not self._routes:
            return
        with self._lock:
            if fingerprint in self._consuming:
                return
            self._consuming[fingerprint] = worker
        queue = pipeline_queue(self._base_queue, fingerprint)
        try:
            routing.consume(self._app, worker, queue)
        except Exception as e:  # affinity is an optimization; the common queue still works
            log.warning("could not start consuming %s: %s", queue, e)
