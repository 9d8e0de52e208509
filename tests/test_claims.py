"""A delivery that lost its chunk writes nothing, and a silent writer cannot hold its locks.

A worker cut off mid-chunk (a network partition) comes back after another delivery claimed
the chunk: its late writes must be refused. Cut off inside a write transaction, it would
keep that transaction's row locks, and the next delivery waiting on them, until TCP gives up;
PostgreSQL ends a write transaction idle for db.results.WRITE_IDLE_LIMIT_MS (30 s) instead.
"""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import Engine, exc, func, select, text

from db import results
from db.models import Detection, JobCapture
from db.results import ClaimLost, Outcome, check_claim, claim_chunk, pending_items, write_results
from db.session import make_sessionmaker
from inference.types import Detection as Det
from inference.types import ItemResult
from tests.worker_jobs import make_job


def _claim(engine: Engine, chunk_id: int) -> results.Claim:
    with make_sessionmaker(engine).begin() as s:
        return claim_chunk(s, chunk_id, worker="w@test", retries=0, max_deliveries=5)


def test_a_delivery_whose_chunk_was_claimed_again_has_its_late_writes_refused(
    clean_pg: Engine,
) -> None:
    job = make_job(clean_pg, ["/x/a.jpg", "/x/b.jpg"], chunk_size=2)
    (chunk,) = job.chunk_ids
    first = _claim(clean_pg, chunk)
    second = _claim(clean_pg, chunk)  # the chunk handed out again: a new claim
    assert first.outcome is second.outcome is Outcome.RUN
    assert first.token and second.token and second.token.claim == first.token.claim + 1
    factory = make_sessionmaker(clean_pg)
    with factory.begin() as s:
        items = pending_items(s, chunk)
    late = [ItemResult(i.capture_id, i.uri, 64, 48, [Det(1, 2, 30, 40, 0.9, "insect", [])])
            for i in items]

    with pytest.raises(ClaimLost, match="its writes are refused"), factory.begin() as s:
        write_results(s, job.job_id, late, first.token)
    with clean_pg.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Detection)) == 0
        assert set(conn.scalars(select(JobCapture.state))) == {"pending"}

    with factory.begin() as s:  # the delivery holding the claim writes them
        assert write_results(s, job.job_id, late, second.token).done == 2


def test_every_claimed_write_transaction_ends_on_the_server_after_30_s_of_silence(
    clean_pg: Engine,
) -> None:
    job = make_job(clean_pg, ["/x/a.jpg"], chunk_size=1)
    claim = _claim(clean_pg, job.chunk_ids[0])
    assert claim.token is not None
    with make_sessionmaker(clean_pg).begin() as s:
        check_claim(s, claim.token)  # what every write of a delivery starts with
        limit = s.scalar(text("SHOW idle_in_transaction_session_timeout"))
    assert limit == "30s" and results.WRITE_IDLE_LIMIT_MS == 30_000


def test_a_writer_gone_silent_mid_transaction_frees_its_locks_once_idle_past_the_limit(
    clean_pg: Engine, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The limit lowered to 1 s: a delivery share-locks its chunk in a write and goes silent
    (as behind a cut cable); a new claim, which locks the chunk for update, gets through
    once the server has ended the silent transaction, and the silent one's session is gone."""
    monkeypatch.setattr(results, "WRITE_IDLE_LIMIT_MS", 1000)
    job = make_job(clean_pg, ["/x/a.jpg"], chunk_size=1)
    (chunk,) = job.chunk_ids
    claim = _claim(clean_pg, chunk)
    assert claim.token is not None
    silent = make_sessionmaker(clean_pg)()
    check_claim(silent, claim.token)  # holds the chunk row's share lock, then says nothing
    claimed_again = threading.Event()

    def claim_again() -> None:
        with clean_pg.connect() as conn:
            conn.execute(text("SET statement_timeout = '60s'"))
            conn.execute(text("UPDATE chunks SET claim = claim + 1 WHERE id = :c"), {"c": chunk})
            conn.commit()
        claimed_again.set()

    waiter = threading.Thread(target=claim_again, daemon=True)
    waiter.start()
    try:
        assert claimed_again.wait(60), "the silent writer still holds its lock"
        with pytest.raises(exc.DBAPIError, match="idle-in-transaction timeout"):
            silent.execute(text("SELECT 1"))
    finally:
        silent.close()
        waiter.join(60)
