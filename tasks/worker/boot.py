"""Worker start-up: one engine per worker process, loaded at start and shared by its chunks.

The pipeline of the TRAPQ_* settings is loaded at start (a worker that cannot load it does not
start) and becomes the first entry of the process's model cache (tasks.worker.pipelines); the
pipelines of the jobs it serves are loaded into that cache on first use.

The models load once per process, never per task: in the worker's own process for the
threads and solo pools (before it consumes anything), in each child for prefork. CUDA is
touched only in the process that runs the models, never in a prefork parent, whose forked
children would inherit a broken CUDA context. A lock guards the lazy singleton, so a task
that arrives first waits for the load instead of starting a second one.

The memory guard lives here too. Celery's worker_max_memory_per_child only works in the
prefork pool; for threads and solo trapq checks the RSS after each chunk and, past
settings.max_memory_mb, asks the worker for a warm shutdown (the chunks in hand finish)
with exit code MEMORY_RESTART_EXIT, on which `trapq worker` starts it again.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil
from celery import signals
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.worker import state as worker_state
from sqlalchemy.orm import Session, sessionmaker

from tasks.celery_app import app
from tasks.pipeline import pipeline_spec
from tasks.settings import Settings, get_settings
from tasks.store import session_factory
from tasks.worker.exits import DEVICE_FAULT_EXIT, LOAD_FAILED_EXIT, MEMORY_RESTART_EXIT
from tasks.worker.metrics import MetricsLogger
from tasks.worker.pipelines import WorkerPipelines

if TYPE_CHECKING:
    from inference.engine import Engine, EngineConfig
    from inference.registry import Pipeline

log = logging.getLogger("trapq.worker")

METRICS_EVERY_S = 60.0
DEVICE_FAULT_GRACE_S = 30.0  # longest a warm shutdown may take on a broken device

# Lets an operator (and the fault tests) find the worker's database sessions.
os.environ.setdefault("PGAPPNAME", "trapq-worker")


@dataclass
class Runtime:
    settings: Settings
    engine: Engine  # imported lazily, so the worker parent stays torch-free
    sessions: sessionmaker[Session]
    pipelines: WorkerPipelines  # the model cache: a chunk runs its job's pipeline
    metrics: MetricsLogger  # images/s, batch sizes, GPU busy, pipelines held, once a minute


_lock = threading.Lock()
_runtime: Runtime | None = None
_prefork = False


def runtime() -> Runtime:
    """The process's engine and session factory, loaded on first use."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = _load(get_settings())
        return _runtime


def engine_config(s: Settings) -> EngineConfig:
    """Every engine setting, by name: a setting renamed on either side fails here, loudly."""
    from inference.engine import EngineConfig
    from inference.fetch import FetchPolicy
    from inference.forward import ForwardOptions

    return EngineConfig(
        fetch=FetchPolicy(
            max_image_bytes=int(s.max_image_mb * 2**20),
            http_connect_timeout_s=s.http_connect_timeout_s,
            http_read_timeout_s=s.http_read_timeout_s,
            http_max_redirects=s.http_max_redirects,
            allowed_schemes=tuple(s.allowed_schemes),
            allowed_roots=tuple(s.allowed_roots),
            allowed_hosts=tuple(s.allowed_hosts),
            pool_size=s.fetch_threads,
        ),
        forward=ForwardOptions(
            crop_batch_size=s.crop_batch_size,
            compile=s.compile,
            compile_backend=s.compile_backend,
            embeddings=s.store_embeddings,
            probabilities=s.store_probabilities,
        ),
        batch_size=s.batch_size,
        batch_wait_ms=s.batch_wait_ms,
        gpu_decode=s.gpu_decode,
        decode_threads=s.decode_threads,
        max_images_in_flight=s.max_images_in_flight,
        max_bytes_in_flight=s.max_bytes_in_flight_mb * 2**20,
        max_image_pixels=s.max_image_pixels,
        max_fetching=s.max_fetching,
    )


def load_models(s: Settings) -> Pipeline:
    """The pipeline the TRAPQ_* settings describe, built from the spec `trapq enqueue` records
    for them (tasks.pipeline.pipeline_spec) and loaded; precision is resolved here, once."""
    from inference.registry import load_pipeline as load

    spec = pipeline_spec(s)
    return load(
        spec.detector,
        spec.classifier,
        spec.filter,
        box_threshold=spec.box_threshold,
        top_k=spec.top_k,
        filter_negative_label=spec.filter_negative_label,
        answers=spec.answers,
        device=s.device,
        precision=s.precision,
        cache_dir=s.weights_cache_dir,
    )


def _load(s: Settings) -> Runtime:
    from inference.engine import Engine

    pipeline = load_models(s)
    engine = Engine(pipeline, engine_config(s))
    engine.start()
    log.info(
        "trapq engine loaded in pid %d (CUDA_VISIBLE_DEVICES=%s): %s",
        os.getpid(),
        os.environ.get("CUDA_VISIBLE_DEVICES", "unset"),
        json.dumps(pipeline.describe(), sort_keys=True),
    )
    pipelines = WorkerPipelines(
        app,
        s.queue,
        device=engine.device,
        precision=pipeline.precision,
        bound_bytes=int(s.model_cache_mb * 2**20),
        prepare=engine.prepare,
        weights_cache_dir=s.weights_cache_dir,
        affinity=s.affinity,
    )
    pipelines.adopt(pipeline, engine.forward)
    metrics = MetricsLogger(engine.stats, METRICS_EVERY_S, extra=pipelines.summary).start()
    rt = Runtime(s, engine, session_factory(s), pipelines, metrics)
    # What is loaded by now (torch, Celery, the models: ~300k objects) lives as long as the
    # process. Frozen, it is out of the collector's reach: else every full collection, which
    # the surviving results of each batch set off, walks it all (result assembly cost 5x).
    gc.freeze()
    return rt


def close() -> None:
    global _runtime
    with _lock:
        if _runtime is not None:
            _runtime.metrics.stop()
            _runtime.engine.close()
            _runtime = None


def memory_guard() -> None:
    """Between chunks: past the RSS limit, stop this worker warmly so it restarts fresh."""
    limit_mb = get_settings().max_memory_mb
    if not limit_mb or _prefork or worker_state.should_stop:
        return
    rss_mb = psutil.Process().memory_info().rss / 2**20
    if rss_mb > limit_mb:
        log.warning(
            "worker RSS %.0f MB is past TRAPQ_MAX_MEMORY_MB=%d: warm shutdown, exit code %d "
            "(trapq worker restarts it)", rss_mb, limit_mb, MEMORY_RESTART_EXIT,
        )
        worker_state.should_stop = MEMORY_RESTART_EXIT


def stop_for_device_fault(reason: str) -> None:
    """After a sticky CUDA error (inference.device_fault), stop this process with
    DEVICE_FAULT_EXIT, on which `trapq worker` starts a fresh one. The chunks in hand fail
    their engine runs with DeviceFault too and are retried (the retry message is in the broker
    before the task returns); if the warm shutdown hangs on the broken device, the process
    ends hard after DEVICE_FAULT_GRACE_S, and the retries are still there."""
    if worker_state.should_stop == DEVICE_FAULT_EXIT:
        return
    log.critical("%s: this worker stops with exit code %d (trapq worker starts it again)",
                 reason, DEVICE_FAULT_EXIT)
    worker_state.should_stop = DEVICE_FAULT_EXIT
    hard_exit = threading.Timer(DEVICE_FAULT_GRACE_S, os._exit, (DEVICE_FAULT_EXIT,))
    hard_exit.daemon = True
    hard_exit.start()


@signals.celeryd_init.connect
def _prefork_memory_limit(conf: Any = None, **_: Any) -> None:
    limit_mb = get_settings().max_memory_mb
    if limit_mb and conf is not None:
        conf.worker_max_memory_per_child = limit_mb * 1024  # KiB, prefork only


def _load_or_exit() -> None:
    # Celery logs and swallows a signal handler's exceptions: a worker whose models failed
    # to load would then take chunks only to fail them. SystemExit goes through and stops it
    # before it consumes anything.
    from inference.engine import EngineStartError

    try:
        runtime()
    except EngineStartError as e:  # its message says what to do: no traceback
        log.critical("trapq engine cannot start, the worker stops: %s", e)
        raise SystemExit(LOAD_FAILED_EXIT) from None
    except Exception:
        log.critical("trapq engine failed to load; the worker stops", exc_info=True)
        raise SystemExit(LOAD_FAILED_EXIT) from None


@signals.celeryd_after_setup.connect
def _load_in_worker_process(instance: Any = None, **_: Any) -> None:
    global _prefork
    pool = getattr(instance, "pool_cls", None)
    _prefork = isinstance(pool, type) and issubclass(pool, PreforkPool)
    if not _prefork:
        _load_or_exit()


@signals.worker_process_init.connect
def _load_in_pool_child(**_: Any) -> None:
    global _prefork
    _prefork = True
    _load_or_exit()


@signals.worker_shutdown.connect
@signals.worker_process_shutdown.connect
def _close(**_: Any) -> None:
    close()
