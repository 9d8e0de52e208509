"""The Celery app and its configuration, all taken from Settings.

The chunk task lives in tasks.chunk and is imported by the worker only (`include`), so the
producer and the CLI never import torch.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from tasks.routing import QUEUE_ORDER
from tasks.settings import Settings, get_settings
from tasks.visibility import redis_broker_options
from tasks.worker import CELERY_INCLUDE

PROCESS_CHUNK = "trapq.process_chunk"
TRACK_JOB = "trapq.track_job"  # tasks.tracking: occurrences once a job ends


def celery_config(s: Settings) -> dict[str, Any]:
    # Kombu's SQLAlchemy transport hands every transport option to create_engine(), and has
    # no visibility timeout to set: the options below are for Redis only.
    redis_opts = {"visibility_timeout": s.visibility_timeout_s}
    broker_opts = redis_broker_options(s) if s.broker_url.startswith("redis") else {}
    if broker_opts:  # a worker polls the pipeline queues it holds before the common one
        broker_opts["queue_order_strategy"] = QUEUE_ORDER
    backend_opts = redis_opts if s.result_backend.startswith("redis") else {}
    return {
        "broker_url": s.broker_url,
        "result_backend": s.result_backend,
        # JSON only: a pickle body is refused, so a forged message cannot run code.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # One chunk per process slot at a time, acknowledged only after it ends: a killed
        # worker's chunk goes back to the queue and no worker hoards messages.
        "worker_prefetch_multiplier": 1,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "broker_transport_options": broker_opts,
        "result_backend_transport_options": backend_opts,
        "task_soft_time_limit": s.chunk_soft_time_limit_s,
        "task_time_limit": s.chunk_time_limit_s,
        # Flower
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "result_extended": True,
        "task_default_queue": s.queue,
        "task_routes": {PROCESS_CHUNK: {"queue": s.queue}, TRACK_JOB: {"queue": s.queue}},
        "broker_connection_retry_on_startup": True,
        "result_expires": 7 * 24 * 3600,
        "worker_proc_alive_timeout": 60,
        # The worker's tasks and signal handlers (boot, guards): tasks.worker names them.
        "include": list(CELERY_INCLUDE),
    }


def make_app(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    if s.embedded:
        # The SQLite files of the embedded broker and backend live in data_dir; SQLite
        # creates files but not folders.
        s.data_dir.mkdir(parents=True, exist_ok=True)
    celery = Celery("trapq")
    celery.conf.update(celery_config(s))
    return celery


app = make_app()
