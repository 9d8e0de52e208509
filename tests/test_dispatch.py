"""The dispatcher's decisions in PostgreSQL: the window, fair order by weight, caps, two
dispatchers at once, chunks in doubt, and stale messages skipped at claim."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, select, text

from db.dispatch import Release, assign_task_ids, recover_in_doubt, release
from db.imports import get_or_create_deployment
from db.models import Chunk, Job, Project
from db.projects import add_project, set_deployment_project
from db.results import Outcome, claim_chunk
from db.session import make_sessionmaker
from tests.worker_jobs import make_job

NOW = datetime(2026, 12, 4, 22, 0, tzinfo=UTC)


def job_in(engine: Engine, project: str | None, n_chunks: int, name: str,
           weight: float = 1.0, cap: int | None = None, chunk_size: int = 2) -> int:
    """A job of n_chunks over new captures of deployment `name`, in `project` (None:
    default), created with that weight and cap."""
    if project is not None:
        with make_sessionmaker(engine).begin() as s:
            add_project(s, project, weight, cap)
            get_or_create_deployment(s, name)
            set_deployment_project(s, name, project)
    uris = [f"file:///{name}/{i}.jpg" for i in range(n_chunks * chunk_size)]
    return make_job(engine, uris, chunk_size=chunk_size, deployment=name).job_id


def round_(engine: Engine, window: int, lane_cap: int = 1) -> Release:
    with make_sessionmaker(engine).begin() as s:
        return release(s, window, NOW, lane_cap)


def released_jobs(engine: Engine, chosen: Release) -> list[int]:
    ids = [a.chunk_id for a in chosen.assigned]
    with engine.connect() as conn:
        by_id = dict(conn.execute(select(Chunk.id, Chunk.job_id).where(Chunk.id.in_(ids))).all())
    return [by_id[i] for i in ids]


def end_chunks(engine: Engine, job_id: int, n: int) -> None:
    """Mark n of the job's out chunks done, as workers would."""
    with engine.begin() as conn:
        conn.execute(text(
            "UPDATE chunks SET state = 'done' WHERE id IN (SELECT id FROM chunks "
            "WHERE job_id = :j AND state IN ('queued', 'running') ORDER BY seq LIMIT :n)"
        ), {"j": job_id, "n": n})


def states(engine: Engine, job_id: int) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(conn.scalars(select(Chunk.state).where(Chunk.job_id == job_id)))


def test_only_the_window_goes_out_oldest_chunks_first_and_an_ended_chunk_frees_a_place(
    clean_pg: Engine,
) -> None:
    job = job_in(clean_pg, None, 10, "trap-a")

    first = round_(clean_pg, window=4)
    again = round_(clean_pg, window=4)

    with clean_pg.connect() as conn:
        seqs = conn.scalars(
            select(Chunk.seq)
            .where(Chunk.job_id == job, Chunk.state == "queued")
            .order_by(Chunk.seq)
        ).all()
        task_ids = conn.scalars(select(Chunk.task_id).where(Chunk.state == "queued")).all()
    assert (len(first.assigned), len(again.assigned)) == (4, 0)
    assert seqs == [0, 1, 2, 3]
    assert sorted(task_ids) == sorted(a.task_id for a in first.assigned)
    end_chunks(clean_pg, job, 3)
    assert len(round_(clean_pg, window=4).assigned) == 3
    assert states(clean_pg, job) == {"done": 3, "queued": 4, "pending": 3}


def test_a_small_job_enqueued_after_a_large_one_shares_the_window_at_once(
    clean_pg: Engine,
) -> None:
    large = job_in(clean_pg, "a", 40, "large")
    round_(clean_pg, window=4)
    small = job_in(clean_pg, "b", 4, "small")

    order: list[int] = []
    for _ in range(4):
        end_chunks(clean_pg, large, 2)
        order += released_jobs(clean_pg, round_(clean_pg, window=4))

    assert order.count(small) == 4, order
    assert order[:4].count(small) >= 2, "the small job does not wait behind the large one"


def test_jobs_of_one_project_share_it_equally(clean_pg: Engine) -> None:
    first = job_in(clean_pg, None, 30, "night-1")
    round_(clean_pg, window=6)
    second = job_in(clean_pg, None, 30, "night-2")
    end_chunks(clean_pg, first, 6)

    counts = Counter(released_jobs(clean_pg, round_(clean_pg, window=6)))

    assert counts == {first: 3, second: 3}


def test_weights_three_to_one_split_what_is_released_three_to_one(clean_pg: Engine) -> None:
    heavy = job_in(clean_pg, "heavy", 60, "h", weight=3)
    light = job_in(clean_pg, "light", 60, "l", weight=1)

    counts: Counter[int] = Counter()
    for _ in range(10):  # a window of 2, as one worker with one slot: the split still holds
        counts.update(released_jobs(clean_pg, round_(clean_pg, window=2)))
        end_chunks(clean_pg, heavy, 2)
        end_chunks(clean_pg, light, 2)

    assert (counts[heavy], counts[light]) == (15, 5)


def test_a_project_never_has_more_than_its_cap_out_and_the_others_take_the_rest(
    clean_pg: Engine,
) -> None:
    capped = job_in(clean_pg, "capped", 20, "c", weight=10, cap=2)
    alone = round_(clean_pg, window=8)
    other = job_in(clean_pg, "other", 20, "o")

    shared = round_(clean_pg, window=8)

    assert len(alone.assigned) == 2, "a cap holds even with nothing else to run"
    assert Counter(released_jobs(clean_pg, shared)) == {other: 6}
    assert states(clean_pg, capped)["queued"] == 2


def test_an_idle_project_banks_no_credit(clean_pg: Engine) -> None:
    busy = job_in(clean_pg, "busy", 100, "busy")
    for _ in range(10):
        round_(clean_pg, window=4)
        end_chunks(clean_pg, busy, 4)
    late = job_in(clean_pg, "late", 100, "late")
    end_chunks(clean_pg, busy, 4)

    counts = Counter(released_jobs(clean_pg, round_(clean_pg, window=4)))

    assert counts == {busy: 2, late: 2}, "the newcomer starts level, not 40 chunks ahead"


def test_two_dispatchers_at_once_release_each_chunk_once(clean_pg: Engine) -> None:
    jobs = [job_in(clean_pg, f"p{i}", 50, f"d{i}") for i in range(3)]
    released: list[list[int]] = [[], []]
    barrier = threading.Barrier(2)

    def dispatch(k: int) -> None:
        barrier.wait()
        for _ in range(40):
            released[k] += [a.chunk_id for a in round_(clean_pg, window=5).assigned]
            for job in jobs:
                end_chunks(clean_pg, job, 1)

    threads = [threading.Thread(target=dispatch, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    both = released[0] + released[1]
    assert len(both) == len(set(both)) == 150
    assert released[0] and released[1]


def test_a_chunk_in_doubt_goes_back_to_pending_and_its_first_message_is_then_stale(
    clean_pg: Engine,
) -> None:
    job = job_in(clean_pg, None, 2, "doubt")
    factory = make_sessionmaker(clean_pg)
    with factory.begin() as s:
        (first,) = assign_task_ids(s, [job_chunk(clean_pg, job, 0)], NOW)
    with factory.begin() as s:
        assert recover_in_doubt(s, NOW + timedelta(seconds=5), timedelta(seconds=30)) == 0
        assert recover_in_doubt(s, NOW + timedelta(seconds=31), timedelta(seconds=30)) == 1
    with factory.begin() as s:
        (again,) = release(s, 1, NOW, 1).assigned

    with factory.begin() as s:
        stale = claim_chunk(s, first.chunk_id, worker="w1", retries=0, max_deliveries=5,
                            task_id=first.task_id)
    with factory.begin() as s:
        current = claim_chunk(s, first.chunk_id, worker="w2", retries=0, max_deliveries=5,
                              task_id=again.task_id)
    assert again.chunk_id == first.chunk_id
    assert (stale.outcome, current.outcome) == (Outcome.STALE, Outcome.RUN)
    with clean_pg.connect() as conn:
        deliveries = conn.scalar(select(Chunk.deliveries).where(Chunk.id == first.chunk_id))
    assert deliveries == 1


def test_a_recovered_chunk_whose_message_did_go_out_runs_once_and_is_not_released_again(
    clean_pg: Engine,
) -> None:
    job = job_in(clean_pg, None, 1, "sent")
    factory = make_sessionmaker(clean_pg)
    with factory.begin() as s:
        (first,) = assign_task_ids(s, [job_chunk(clean_pg, job, 0)], NOW)
    with factory.begin() as s:
        recover_in_doubt(s, NOW + timedelta(minutes=1), timedelta(seconds=30))
    with factory.begin() as s:
        claim = claim_chunk(s, first.chunk_id, worker="w", retries=0, max_deliveries=5,
                            task_id=first.task_id)

    assert claim.outcome is Outcome.RUN
    assert round_(clean_pg, window=4).assigned == []


def job_chunk(engine: Engine, job_id: int, seq: int) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(Chunk.id).where(Chunk.job_id == job_id, Chunk.seq == seq)) or 0


def test_jobs_keep_the_project_their_deployment_had_when_enqueued(clean_pg: Engine) -> None:
    before = job_in(clean_pg, "first", 1, "moving")
    factory = make_sessionmaker(clean_pg)
    with factory.begin() as s:
        add_project(s, "second", 1.0, None)
        set_deployment_project(s, "moving", "second")
    after = make_job(clean_pg, ["file:///moving/x.jpg"], chunk_size=2,
                     deployment="moving").job_id

    with clean_pg.connect() as conn:
        names = dict(conn.execute(
            select(Job.id, Project.name).join(Project, Project.id == Job.project_id)
        ).all())
    assert (names[before], names[after]) == ("first", "second")
