"""Worker start-up: one engine per worker process, loaded at start and shared by its chunks.

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

import json
import logging
import os
import threading
from dataclasses import dataclass, fields
from typing import Any

import psutil
from celery import signals
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.worker import state as worker_state
from sqlalchemy.orm import Session, sessionmaker

from tasks.metrics import start_metrics_logger
from tasks.settings import Settings, get_settings
from tasks.store import session_factory

log = logging.getLogger("trapq.worker")

MEMORY_RESTART_EXIT = 75  # EX_TEMPFAIL: the worker stopped itself to come back with less RSS
LOAD_FAILED_EXIT = 78  # EX_CONFIG: the models could not be loaded

# Lets an operator (and the fault tests) find the worker's database sessions.
os.environ.setdefault("PGAPPNAME", "trapq-worker")


@dataclass
class Runtime:
    settings: Settings
    engine: Any  # inference.engine.Engine, imported lazily so the worker parent stays torch-free
    sessions: sessionmaker[Session]
    description: dict[str, Any]
    metrics: Any  # tasks.metrics.MetricsLogger: images/s, batch sizes, GPU busy, once a minute


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


def engine_config(settings: Settings) -> Any:
    """EngineConfig from the settings of the same names (Engine and Bad input sections)."""
    from inference.engine import EngineConfig

    values: dict[str, Any] = {}
    for f in fields(EngineConfig):
        if hasattr(settings, f.name):
            value = getattr(settings, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    values["max_bytes_in_flight"] = settings.max_bytes_in_flight_mb * 2**20
    return EngineConfig(**values)


def _load(s: Settings) -> Runtime:
    from inference.engine import Engine
    from inference.registry import load_pipeline

    pipeline = load_pipeline(
        detector=s.detector,
        classifier=s.classifier,
        device=s.device,
        detector_weights=s.detector_weights or None,
        detector_labels=s.detector_labels or None,
        detector_sha256=s.detector_sha256 or None,
        classifier_weights=s.classifier_weights or None,
        classifier_labels=s.classifier_labels or None,
        classifier_sha256=s.classifier_sha256 or None,
        filter_classifier=s.filter_classifier or None,
        filter_weights=s.filter_weights or None,
        filter_labels=s.filter_labels or None,
        random_weights=s.random_weights,
        cache_dir=s.weights_cache_dir,
        box_threshold=s.box_threshold,
        precision=s.precision,
    )
    engine = Engine(pipeline, engine_config(s))
    engine.start()
    description = pipeline.describe()
    log.info(
        "trapq engine loaded in pid %d (CUDA_VISIBLE_DEVICES=%s): %s",
        os.getpid(),
        os.environ.get("CUDA_VISIBLE_DEVICES", "unset"),
        json.dumps(description, sort_keys=True),
    )
    return Runtime(s, engine, session_factory(s), description, start_metrics_logger(engine))


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


@signals.celeryd_init.connect
def _prefork_memory_limit(conf: Any = None, **_: Any) -> None:
    limit_mb = get_settings().max_memory_mb
    if limit_mb and conf is not None:
        conf.worker_max_memory_per_child = limit_mb * 1024  # KiB, prefork only


def _load_or_exit() -> None:
    # Celery logs and swallows a signal handler's exceptions: a worker whose models failed
    # to load would then take chunks only to fail them. SystemExit goes through and stops it
    # before it consumes anything.
    try:
        runtime()
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
