"""`trapq worker` as an operator runs it: restarts, giving up, shutdowns, what children get.

Every test runs the real command (a supervisor process and its Celery worker children)
against the real services; the SIGKILL of the supervisor itself is the supervisor_kill
scenario of tests/fault_scenarios.py (tests/test_faults.py).
"""

from __future__ import annotations

import os
import signal

import psutil
import pytest
import redis
from sqlalchemy import Engine

from tests import fault_scenarios as fs
from tests.badinputs import ImageServer
from tests.trapq_cli import TRAPQ, installed_trapq
from tests.worker_jobs import (
    BOXES_PER_IMAGE,
    chunk_rows,
    detections_per_capture,
    item_states,
    make_job,
)
from tests.worker_process import WorkerProcess, wait_for

pytestmark = pytest.mark.worker  # every test starts `trapq worker`


def _supervisor(worker_factory, env: dict[str, str], *args: str) -> WorkerProcess:
    argv = [str(TRAPQ), "worker", "--concurrency", "1", *(args or ("--gpus", "cpu"))]
    return worker_factory(env, argv=argv, node="cpu@%h")


def _children(supervisor: WorkerProcess) -> list[psutil.Process]:
    """The supervisor's Celery worker children (not the dispatcher beside them)."""
    workers = []
    for child in fs.alive(psutil.Process(supervisor.pid).children()):
        try:
            if "celery" in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.NoSuchProcess:
            pass
    return workers


def _assert_every_capture_once(engine: Engine, job_id: int, n: int) -> None:
    assert item_states(engine, job_id) == {"done": n}
    per_capture = detections_per_capture(engine, job_id)
    assert len(per_capture) == n and set(per_capture.values()) == {BOXES_PER_IMAGE}
    assert fs.audit(engine, job_id).duplicates == 0


def test_trapq_worker_restarts_a_child_killed_by_sigkill_and_its_chunk_is_done_once(
    lab_env: dict[str, str], clean_pg: Engine, worker_factory,
) -> None:
    env = dict(lab_env, TRAPQ_WORKER_CRASH_PAUSE_S="1")
    n = 24
    with ImageServer() as server:
        job = make_job(clean_pg, [f"{server.url}/img/{i}.jpg" for i in range(n)], chunk_size=n)
        fs.hold_last_images(server, n)
        supervisor = _supervisor(worker_factory, env).start()  # its dispatcher sends the chunk
        wait_for(lambda: fs.mid_chunk(clean_pg, job.job_id, supervisor), 60, "mid-chunk",
                 every=0.05, on_timeout=supervisor.tail)
        (child,) = _children(supervisor)
        child.kill()  # what the kernel's OOM killer does too
        server.release()
        wait_for(lambda: [c for c in _children(supervisor) if c.pid != child.pid], 60,
                 "a new child", on_timeout=supervisor.tail)
        # The new child sweeps the killed delivery back once the visibility timeout passed.
        wait_for(lambda: chunk_rows(clean_pg, job.job_id)[0].state == "done", 120,
                 "the chunk done by the new child", on_timeout=supervisor.tail)
        supervisor.stop()
    assert "exited -9; starting it again" in supervisor.log_text()
    _assert_every_capture_once(clean_pg, job.job_id, n)
    assert chunk_rows(clean_pg, job.job_id)[0].deliveries >= 2


def test_trapq_worker_gives_up_on_a_child_that_keeps_crashing_at_start(
    service_env: dict[str, str],
) -> None:
    # An unknown log level makes every `celery worker` child exit 2 before it does anything.
    env = dict(service_env, TRAPQ_WORKER_CRASH_PAUSE_S="0.2")
    result = installed_trapq(env, "worker", "--gpus", "cpu", "--loglevel", "NOPE", timeout=180)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("exited 2; starting it again") == 4, result.stderr[-2000:]
    assert "exited 2, 5 times right after start; not starting it again" in result.stderr


def test_trapq_worker_does_not_restart_a_child_whose_models_fail_to_load(
    service_env: dict[str, str],
) -> None:
    env = dict(service_env, TRAPQ_DETECTOR="no_such_detector")
    result = installed_trapq(env, "worker", "--gpus", "cpu", timeout=180)
    assert result.returncode == 78, result.stderr[-2000:]  # LOAD_FAILED_EXIT
    assert "could not load its models (exit 78" in result.stderr
    assert result.stderr.count("started cpu@") == 1
    assert "; starting it again" not in result.stderr


def test_a_second_signal_turns_the_warm_shutdown_cold_and_the_chunk_goes_back_to_the_queue(
    lab_env: dict[str, str], clean_pg: Engine, worker_factory,
) -> None:
    n = 24
    with ImageServer() as server:
        job = make_job(clean_pg, [f"{server.url}/img/{i}.jpg" for i in range(n)], chunk_size=n)
        fs.hold_last_images(server, n)  # the chunk outlasts the two signals
        supervisor = _supervisor(worker_factory, lab_env).start()  # its dispatcher sends it
        wait_for(lambda: fs.mid_chunk(clean_pg, job.job_id, supervisor), 60, "mid-chunk",
                 every=0.05, on_timeout=supervisor.tail)
        supervisor.signal(signal.SIGTERM)
        wait_for(lambda: "warm shutdown of 1 worker" in supervisor.log_text(), 30,
                 "the warm shutdown", on_timeout=supervisor.tail)
        supervisor.signal(signal.SIGTERM)
        wait_for(lambda: "stopped: cold shutdown" in supervisor.log_text(), 30,
                 "the chunk cut short", on_timeout=supervisor.tail)
        server.release()  # else the child's exit waits on its fetch thread's read timeout
        assert supervisor.wait(60) == 0, supervisor.tail()
        assert "cold shutdown of 1 worker" in supervisor.log_text()
        assert item_states(clean_pg, job.job_id).get("pending", 0) > 0, "the chunk had ended"
        # Cut short unacknowledged, the message is back on the queue at once (no timeout).
        client = redis.Redis.from_url(lab_env["TRAPQ_BROKER_URL"])
        try:
            assert client.llen(lab_env["TRAPQ_QUEUE"]) == 1
        finally:
            client.close()
        second = _supervisor(worker_factory, lab_env).start()
        wait_for(lambda: chunk_rows(clean_pg, job.job_id)[0].state == "done", 120,
                 "the chunk done after its redelivery", on_timeout=second.tail)
        second.stop()
    _assert_every_capture_once(clean_pg, job.job_id, n)


def test_children_get_one_gpu_each_and_the_malloc_threshold_and_stop_with_their_group(
    service_env: dict[str, str], worker_factory,
) -> None:
    env = {k: v for k, v in service_env.items()
           if k not in ("CUDA_VISIBLE_DEVICES", "MALLOC_MMAP_THRESHOLD_")}
    env.update(TRAPQ_DEVICE="cpu")  # GPU indices given, the models still load on the CPU here
    supervisor = _supervisor(worker_factory, env, "--gpus", "0,1").start()
    wait_for(lambda: supervisor.log_text().count(" ready.") >= 2, 120, "both children ready",
             on_timeout=supervisor.tail)
    children = _children(supervisor)
    envs = {c.environ()["CUDA_VISIBLE_DEVICES"]: c.environ() for c in children}
    assert sorted(envs) == ["0", "1"]
    for gpu, child_env in envs.items():
        assert child_env["MALLOC_MMAP_THRESHOLD_"] == str(4 * 2**20)
        assert child_env["PGAPPNAME"] == f"trapq-worker-gpu{gpu}"
        assert child_env["TRAPQ_SUPERVISOR_PID"] == str(supervisor.pid)
    # An operator's `kill -TERM -PGID`: every process warm, once; nothing left behind.
    os.killpg(supervisor.pid, signal.SIGTERM)
    assert supervisor.wait(60) == 0, supervisor.tail()
    wait_for(lambda: not fs.alive(children), 30, "the children to exit")
    assert "warm shutdown of 2 worker" in supervisor.log_text()


@pytest.fixture
def lab_env(service_env: dict[str, str]) -> dict[str, str]:
    return fs.fault_env(service_env)

