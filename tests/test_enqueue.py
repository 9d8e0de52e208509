"""Enqueue: a job's chunks in PostgreSQL, one JSON message per chunk on the Redis queue."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from celery import Celery
from kombu.exceptions import OperationalError
from sqlalchemy import Engine, event, text

import tasks.producer as producer
from db.imports import CaptureRow, get_or_create_deployment, insert_captures
from db.jobs import JobPlan
from db.session import make_sessionmaker
from inference.pipeline_spec import PipelineSpec
from inference.registry import REGISTRY
from tasks.celery_app import PROCESS_CHUNK
from tasks.pipeline import pipeline_spec
from tasks.settings import Settings
from tasks.store import session_factory
from tests.inference_fixtures import http_server
from tests.trapq_cli import one_line_error, trapq
from tests.worker_jobs import plan_job

T0 = datetime(2024, 6, 1, 21, 0, tzinfo=UTC)


def minute(i: int) -> datetime:
    return T0 + timedelta(minutes=i)


def add_captures(engine: Engine, deployment: str, n: int) -> None:
    """Captures taken one a minute from T0, inserted in reverse so ids and time disagree."""
    rows = (
        CaptureRow(
            uri=f"s3://trap/{deployment}/{i:05d}.jpg",
            captured_at=minute(i),
            width=None,
            height=None,
        )
        for i in reversed(range(n))
    )
    with make_sessionmaker(engine).begin() as session:
        insert_captures(session, get_or_create_deployment(session, deployment), rows)


@pytest.fixture
def settings(tmp_path: Path, pg_url: str, redis_url: str, queue_name: str) -> Settings:
    return Settings(
        data_dir=tmp_path,
        database_url=pg_url,
        broker_url=redis_url,
        result_backend=redis_url,
        queue=queue_name,
    )


@pytest.fixture
def queue(redis_url: str, queue_name: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def messages(client: redis.Redis, queue_name: str) -> list[dict[str, object]]:
    """The task messages waiting on the queue, oldest first, with their bodies decoded."""
    out = []
    for raw in reversed(client.lrange(queue_name, 0, -1)):
        envelope = json.loads(raw)
        assert envelope["content-type"] == "application/json"
        assert envelope["properties"]["body_encoding"] == "base64"
        args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        out.append(
            {
                "task": envelope["headers"]["task"],
                "shadow": envelope["headers"]["shadow"],
                "id": envelope["headers"]["id"],
                "args": args,
                "kwargs": kwargs,
            }
        )
    return out


def planned_job(engine: Engine, n_chunks: int) -> JobPlan:
    """A job over a deployment of n_chunks x 10 captures, planned and committed, not sent."""
    add_captures(engine, "trap-a", 10 * n_chunks)
    with make_sessionmaker(engine).begin() as session:
        deployment_id = get_or_create_deployment(session, "trap-a")
        return plan_job(session, deployment_id, chunk_size=10)


def chunk_rows(engine: Engine, job_id: int) -> list[tuple[int, int, str, str | None, int]]:
    with engine.connect() as conn:
        return [
            tuple(r)  # type: ignore[misc]
            for r in conn.execute(
                text(
                    "SELECT c.id, c.n_items, c.state, c.task_id, "
                    "(SELECT count(*) FROM job_captures jc WHERE jc.chunk_id = c.id) "
                    "FROM chunks c WHERE c.job_id = :job ORDER BY c.seq"
                ),
                {"job": job_id},
            )
        ]


def test_enqueue_puts_every_capture_in_exactly_one_chunk_and_one_message_per_chunk(
    settings: Settings, clean_pg: Engine, queue: redis.Redis, queue_name: str
) -> None:
    add_captures(clean_pg, "trap-a", 150)

    result = producer.enqueue(settings, "trap-a", chunk_size=64)

    assert (result.n_captures, result.n_chunks, result.sent, result.failed) == (150, 3, 3, 0)
    chunks = chunk_rows(clean_pg, result.job_id)  # type: ignore[arg-type]
    assert [(n_items, state, members) for _, n_items, state, _, members in chunks] == [
        (64, "queued", 64),
        (64, "queued", 64),
        (22, "queued", 22),
    ]
    with clean_pg.connect() as conn:
        per_capture = conn.execute(
            text(
                "SELECT c.captured_at, count(jc.chunk_id), min(ch.seq) FROM captures c "
                "LEFT JOIN job_captures jc ON jc.capture_id = c.id "
                "LEFT JOIN chunks ch ON ch.id = jc.chunk_id "
                "GROUP BY c.id, c.captured_at ORDER BY c.captured_at"
            )
        ).all()
    assert [n for _, n, _ in per_capture] == [1] * 150
    # chunks hold neighbouring frames: the first 64 minutes are chunk 0, and so on
    assert [seq for _, _, seq in per_capture] == [i // 64 for i in range(150)]
    # Flower shows each task by its shadow name: pipeline, job and chunk, numbered from 1.
    job = result.job_id
    assert messages(queue, queue_name) == [
        {"task": PROCESS_CHUNK, "shadow": f"default@1 · job {job} · chunk {n}/3", "id": task_id,
         "args": [chunk_id], "kwargs": {}}
        for n, (chunk_id, _, _, task_id, _) in enumerate(chunks, start=1)
    ]


def test_enqueue_takes_only_captures_in_the_time_window_up_to_the_limit(
    settings: Settings, clean_pg: Engine, queue: redis.Redis, queue_name: str
) -> None:
    add_captures(clean_pg, "trap-a", 200)
    add_captures(clean_pg, "trap-b", 50)

    result = producer.enqueue(
        settings, "trap-a", since=minute(10), until=minute(100), limit=50, chunk_size=16
    )

    assert (result.n_captures, result.n_chunks) == (50, 4)
    with clean_pg.connect() as conn:
        taken = (
            conn.execute(
                text(
                    "SELECT c.captured_at FROM job_captures jc "
                    "JOIN captures c ON c.id = jc.capture_id "
                    "WHERE jc.job_id = :job ORDER BY c.captured_at"
                ),
                {"job": result.job_id},
            )
            .scalars()
            .all()
        )
    assert taken == [minute(i) for i in range(10, 60)]
    assert [n for _, n, _, _, _ in chunk_rows(clean_pg, result.job_id)] == [16, 16, 16, 2]  # type: ignore[arg-type]
    assert len(messages(queue, queue_name)) == 4


def test_only_unprocessed_skips_captures_done_by_a_job_with_the_same_pipeline(
    settings: Settings, clean_pg: Engine
) -> None:
    add_captures(clean_pg, "trap-a", 100)
    first = producer.enqueue(settings, "trap-a", chunk_size=10)
    with clean_pg.begin() as conn:
        conn.execute(
            text(
                "UPDATE job_captures SET state = 'done' WHERE job_id = :job AND capture_id IN "
                "(SELECT capture_id FROM job_captures WHERE job_id = :job "
                "ORDER BY capture_id LIMIT 30)"
            ),
            {"job": first.job_id},
        )

    weights = Path(REGISTRY["demo_classifier"].default_weights or "")
    moved = shutil.copy(weights, settings.data_dir / "same-bytes.pt")
    other = settings.data_dir / "other-bytes.pt"
    other.write_bytes(weights.read_bytes() + b"\0")  # never loaded: enqueue only hashes it
    variants = {
        "again": {},
        "same bytes elsewhere": {"classifier_weights": str(moved)},
        "other threshold": {"box_threshold": 0.3},
        "other weights": {"classifier_weights": str(other)},
        "other top-k": {"top_k": 3},
    }
    taken = {
        name: producer.enqueue(
            settings.model_copy(update=change), "trap-a", only_unprocessed=True, dry_run=True
        ).n_captures
        for name, change in variants.items()
    }

    assert taken == {
        "again": 70,
        "same bytes elsewhere": 70,
        "other threshold": 100,
        "other weights": 100,
        "other top-k": 100,
    }
    with clean_pg.connect() as conn:
        stored, fingerprint = conn.execute(
            text("SELECT pipeline, fingerprint FROM jobs WHERE id = :j"), {"j": first.job_id}
        ).one()
    assert PipelineSpec.from_dict(stored).fingerprint() == fingerprint


def test_weights_from_a_presigned_url_are_named_by_their_bytes_and_the_secret_never_stored(
    settings: Settings, clean_pg: Engine, queue: redis.Redis
) -> None:
    add_captures(clean_pg, "trap-a", 5)
    weights = Path(REGISTRY["demo_classifier"].default_weights or "")
    with http_server() as server:
        signed = "cls.pt?X-Amz-Signature=hunter2"
        server.files[signed] = weights.read_bytes()
        remote = settings.model_copy(
            update={
                "classifier_weights": f"{server.base}/file/{signed}",
                "weights_cache_dir": settings.data_dir / "weights",
            }
        )
        job = producer.enqueue(remote, "trap-a")
    with clean_pg.connect() as conn:
        stored, fingerprint = conn.execute(
            text("SELECT pipeline, fingerprint FROM jobs WHERE id = :j"), {"j": job.job_id}
        ).one()
    assert "hunter2" not in json.dumps(stored)
    assert fingerprint == pipeline_spec(settings).fingerprint()  # same bytes as the local file


def test_dry_run_counts_but_creates_and_sends_nothing(
    settings: Settings, clean_pg: Engine, queue: redis.Redis, queue_name: str
) -> None:
    add_captures(clean_pg, "trap-a", 100)

    result = producer.enqueue(settings, "trap-a", chunk_size=64, dry_run=True)

    assert (result.job_id, result.n_captures, result.n_chunks) == (None, 100, 2)
    with clean_pg.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 0
    assert messages(queue, queue_name) == []


def test_chunks_whose_messages_cannot_be_sent_stay_pending(
    settings: Settings, clean_pg: Engine, queue: redis.Redis, queue_name: str
) -> None:
    plan = planned_job(clean_pg, 4)
    broker_down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})

    result = producer.send_chunks(broker_down, make_sessionmaker(clean_pg), plan.chunk_ids)

    assert (result.sent, result.failed) == (0, 4)
    assert [(state, task_id) for _, _, state, task_id, _ in chunk_rows(clean_pg, plan.job_id)] == [
        ("pending", None)
    ] * 4


def test_one_failed_send_leaves_only_its_chunk_pending(
    settings: Settings,
    clean_pg: Engine,
    queue: redis.Redis,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan = planned_job(clean_pg, 4)
    unlucky = plan.chunk_ids[1]
    send_task = Celery.send_task

    def flaky_send(app: Celery, name: str, args: list[int], **kw: object) -> object:
        if args == [unlucky]:
            raise OperationalError("connection reset by peer")
        return send_task(app, name, args=args, **kw)

    monkeypatch.setattr(producer, "SEND_BATCH", 1)
    monkeypatch.setattr(Celery, "send_task", flaky_send)

    result = producer.send_chunks(settings, make_sessionmaker(clean_pg), plan.chunk_ids)

    assert (result.sent, result.failed) == (3, 1)
    states = {cid: state for cid, _, state, _, _ in chunk_rows(clean_pg, plan.job_id)}
    assert states == {cid: "pending" if cid == unlucky else "queued" for cid in plan.chunk_ids}
    assert [m["args"] for m in messages(queue, queue_name)] == [
        [cid] for cid in plan.chunk_ids if cid != unlucky
    ]


def test_producer_gives_up_after_three_failed_batches_in_a_row_leaving_the_rest_pending(
    settings: Settings,
    clean_pg: Engine,
    queue: redis.Redis,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A success between failures keeps it sending; three failed batches in a row mean the
    broker is gone: the chunks after them are not even tried, and all stay pending."""
    plan = planned_job(clean_pg, 8)
    ids = plan.chunk_ids
    refused = {ids[1], ids[3], ids[4], ids[5]}
    tried: list[int] = []
    send_task = Celery.send_task

    def refusing_send(app: Celery, name: str, args: list[int], **kw: object) -> object:
        tried.append(args[0])
        if args[0] in refused:
            raise OperationalError("connection refused")
        return send_task(app, name, args=args, **kw)

    monkeypatch.setattr(producer, "SEND_BATCH", 1)
    monkeypatch.setattr(Celery, "send_task", refusing_send)

    result = producer.send_chunks(settings, make_sessionmaker(clean_pg), ids)

    assert tried == ids[:6], "nothing is tried after the third failure in a row"
    assert (result.sent, result.failed) == (2, 6)
    assert "connection refused" in result.error
    states = {cid: state for cid, _, state, _, _ in chunk_rows(clean_pg, plan.job_id)}
    assert states == {cid: "queued" if cid in (ids[0], ids[2]) else "pending" for cid in ids}
    assert [m["args"] for m in messages(queue, queue_name)] == [[ids[0]], [ids[2]]]


def test_enqueue_plans_from_one_snapshot_while_an_import_commits_in_between(
    settings: Settings, clean_pg: Engine, queue: redis.Redis, queue_name: str
) -> None:
    """An import that commits after the producer counted but before it inserts the work items
    changes nothing in the plan: count, chunks and work items come from one snapshot, and
    the new captures wait for the next enqueue."""
    add_captures(clean_pg, "trap-a", 30)
    producer_engine = session_factory(settings).kw["bind"]
    imported: list[bool] = []

    def import_meanwhile(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if "INSERT INTO chunks" in statement and not imported:
            add_captures(clean_pg, "trap-a", 40)  # 10 more, committed on another connection
            imported.append(True)

    event.listen(producer_engine, "before_cursor_execute", import_meanwhile)
    try:
        result = producer.enqueue(settings, "trap-a", chunk_size=8)
    finally:
        event.remove(producer_engine, "before_cursor_execute", import_meanwhile)

    assert imported == [True]
    assert (result.n_captures, result.n_chunks, result.sent) == (30, 4, 4)
    chunks = chunk_rows(clean_pg, result.job_id)  # type: ignore[arg-type]
    assert [(n_items, members) for _, n_items, _, _, members in chunks] == [
        (8, 8), (8, 8), (8, 8), (6, 6)
    ]
    with clean_pg.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM captures")).scalar() == 40
        planned = conn.execute(text(
            "SELECT max(c.captured_at) FROM job_captures jc JOIN captures c ON c.id = jc.capture_id"
        )).scalar()
    assert planned == minute(29), "the captures imported meanwhile are not in the job"


def test_enqueue_command_prints_the_job_id_and_fills_the_queue(
    service_env: dict[str, str], clean_pg: Engine, queue: redis.Redis, queue_name: str
) -> None:
    add_captures(clean_pg, "trap-a", 100)

    result = trapq(service_env, "enqueue", "trap-a", "--chunk-size", "30")

    assert result.returncode == 0, result.stderr
    job_id = int(result.stdout.strip())
    assert [n for _, n, _, _, _ in chunk_rows(clean_pg, job_id)] == [30, 30, 30, 10]
    assert len(messages(queue, queue_name)) == 4
    with clean_pg.connect() as conn:
        pipeline = conn.execute(
            text("SELECT pipeline FROM jobs WHERE id = :j"), {"j": job_id}
        ).scalar()
    assert pipeline["detector"]["name"] and "box_threshold" in pipeline


@pytest.mark.parametrize(
    "args, env_change, expected",
    [
        (["enqueue", "no-such-trap"], {}, "unknown deployment 'no-such-trap'"),
        (["enqueue", "trap-a", "--since", "last tuesday"], {}, "--since: not a timestamp"),
        (["enqueue", "trap-a", "--since", "2030-01-01"], {}, "no captures of 'trap-a' match"),
        (
            ["enqueue", "trap-a"],
            {"TRAPQ_CLASSIFIER_WEIGHTS": "/no/such/weights.pt"},
            "weights file not found: /no/such/weights.pt",
        ),
        (
            ["enqueue", "trap-a"],
            {"TRAPQ_FILTER_CLASSIFIER": "demo_classifier", "TRAPQ_FILTER_SHA256": "0" * 64},
            "sha256 mismatch",
        ),
        (
            ["enqueue", "trap-a"],
            {"TRAPQ_BROKER_URL": "redis://:hunter2@127.0.0.1:1/0"},
            "cannot reach the broker",
        ),
        (
            ["deployments"],
            {"TRAPQ_DATABASE_URL": "postgresql+psycopg://trapq:hunter2@127.0.0.1:1/trapq"},
            "cannot use the database",
        ),
    ],
)
def test_user_errors_are_one_line_without_secrets_and_exit_1(
    service_env: dict[str, str],
    clean_pg: Engine,
    args: list[str],
    env_change: dict[str, str],
    expected: str,
) -> None:
    add_captures(clean_pg, "trap-a", 5)

    line = one_line_error(trapq(service_env | env_change, *args))

    assert expected in line
    assert "hunter2" not in line
    with clean_pg.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 0
