"""A worker process imports neither typer nor rich (the command line's libraries): library code
raises tasks.errors.UserError and only tasks.cli formats it. Seen through a real worker that
runs a chunk under `python -X importtime`, which logs every module the process imports."""

from __future__ import annotations

import sys
from pathlib import Path

from sqlalchemy import Engine

from tasks.worker.supervisor import celery_argv
from tests.worker_jobs import ENDED, job_state, make_job, send, worker_env, write_jpegs
from tests.worker_process import wait_for


def test_a_worker_that_ran_a_chunk_never_imported_typer_or_rich(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory,
) -> None:
    env = worker_env(service_env)
    argv = celery_argv(env["TRAPQ_QUEUE"], "imports@%h", pool="threads", concurrency=1)
    worker = worker_factory(env, argv=[sys.executable, "-X", "importtime", *argv[1:]]).start()
    job = make_job(clean_pg, [str(p) for p in write_jpegs(tmp_path / "images", 2)], chunk_size=2)
    send(env, clean_pg, job.chunk_ids)
    wait_for(lambda: job_state(clean_pg, job.job_id) in ENDED, 60, "the chunk to run",
             on_timeout=worker.tail)
    assert job_state(clean_pg, job.job_id) == "done"

    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in worker.log_text().splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert {"celery", "torch", "tasks", "db", "inference"} <= imported  # the log is complete
    assert not imported & {"typer", "rich"}
