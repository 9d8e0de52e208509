"""Stalls are caught while they happen, and workers of one queue agree on when a chunk returns.

A fetch that hangs must not freeze the chunk's heartbeat (else `trapq requeue --stuck-after`
cannot tell a slow chunk from a dead one) nor hold its deadline back; a worker with another
visibility timeout than its queue's live workers would hand their chunks out early.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import pytest
from sqlalchemy import Engine

from tests import fault_scenarios as fs
from tests.worker_jobs import (
    BOXES_PER_IMAGE,
    chunk_rows,
    detections_per_capture,
    item_states,
    make_job,
    send,
)
from tests.worker_process import wait_for


@pytest.fixture
def hanging_host() -> Iterator[fs.HangingHost]:
    with fs.HangingHost() as host:
        yield host


def test_a_hung_fetch_neither_freezes_the_heartbeat_nor_holds_back_the_deadline(
    service_env: dict[str, str], clean_pg: Engine, worker_factory,
    hanging_host: fs.HangingHost,
) -> None:
    host = hanging_host
    base = host.url
    # The fetch could hang for 5 minutes; the chunk's deadline is 5 s (fs.FAULT_TIMEOUTS).
    env = fs.fault_env(service_env, TRAPQ_HTTP_READ_TIMEOUT_S="300", TRAPQ_FETCH_THREADS="2")
    uris = [f"{base}/img{i}.jpg" for i in range(3)] + [f"{base}/hang.jpg"]
    job = make_job(clean_pg, uris, chunk_size=len(uris))
    worker = worker_factory(env, concurrency=1).start()
    send(env, clean_pg, job.chunk_ids)

    wait_for(lambda: host.entered.is_set() and item_states(clean_pg, job.job_id).get("done") == 3,
             60, "three captures done and the fourth hanging", on_timeout=worker.tail)
    beats: set[datetime] = set()

    def beating() -> bool:
        (chunk,) = chunk_rows(clean_pg, job.job_id)
        if chunk.state == "running" and chunk.heartbeat_at is not None:
            beats.add(chunk.heartbeat_at)
        return len(beats) >= 3

    # No result comes back while the fetch hangs; the heartbeat goes on regardless.
    wait_for(beating, 30, "heartbeats during the hung fetch", on_timeout=worker.tail)
    assert not host.release.is_set() and item_states(clean_pg, job.job_id).get("done") == 3
    # The deadline stops the run while the fetch still hangs, and the chunk is retried.
    wait_for(lambda: "past its deadline of 5s" in (chunk_rows(clean_pg, job.job_id)[0].error
                                                    or ""), 60, "the deadline",
             on_timeout=worker.tail)
    assert not host.release.is_set()
    host.release.set()
    wait_for(lambda: chunk_rows(clean_pg, job.job_id)[0].state == "done", 120,
             "the retry to finish the chunk", on_timeout=worker.tail)
    assert item_states(clean_pg, job.job_id) == {"done": 4}
    assert set(detections_per_capture(clean_pg, job.job_id).values()) == {BOXES_PER_IMAGE}
    assert chunk_rows(clean_pg, job.job_id)[0].attempts >= 2


def test_a_worker_with_another_visibility_timeout_than_its_queues_live_workers_does_not_start(
    service_env: dict[str, str], worker_factory,
) -> None:
    env = fs.fault_env(service_env)  # visibility timeout 7 s
    first = worker_factory(env, concurrency=1).start()
    other = worker_factory(dict(env, TRAPQ_VISIBILITY_TIMEOUT_S="20"), concurrency=1)
    with pytest.raises(RuntimeError, match="worker exited 78"):
        other.start()
    refusals = [line for line in other.log_text().splitlines()
                if "TRAPQ_VISIBILITY_TIMEOUT_S=20, but a live worker" in line]
    assert len(refusals) == 1 and "uses 7" in refusals[0], other.tail()
    assert "engine loaded" not in other.log_text()  # refused before loading any model
    # Same timeout: welcome. Once the first worker has stopped, its lease is gone.
    worker_factory(env, concurrency=1).start().stop()
    first.stop()
    other.start().stop()
