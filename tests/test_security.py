"""Security: non-JSON task bodies refused, URL settings validated, fetching confined to allowed
schemes, folders and hosts, and no password in logs, CLI output, job rows or task messages.

The pickle body is refused in tests/test_worker_faults.py and Flower's required auth in the
compose file is checked in tests/test_deploy_files.py; they are not repeated here.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kombu import Connection, Exchange, Queue
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from tasks.celery_app import PROCESS_CHUNK
from tests.badinputs import ImageServer
from tests.fault_scenarios import redis_server, wait_job_end
from tests.trapq_cli import installed_trapq, one_line_error, trapq
from tests.worker_jobs import (
    BOXES_PER_IMAGE,
    chunk_rows,
    detections_per_capture,
    make_job,
    send,
    worker_env,
    write_jpegs,
)
from tests.worker_process import wait_for


def _publish_raw(url: str, queue: str, body: bytes, content_type: str) -> None:
    """A task message as Celery's protocol 2 frames it, but with a body of another type."""
    task_id = str(uuid.uuid4())
    exchange = Exchange(queue, "direct")
    with Connection(url) as conn:
        conn.Producer().publish(
            body, exchange=exchange, routing_key=queue,
            declare=[Queue(queue, exchange, routing_key=queue)],
            content_type=content_type, content_encoding="binary",
            headers={"lang": "py", "task": PROCESS_CHUNK, "id": task_id, "root_id": task_id,
                     "retries": 0, "argsrepr": "", "kwargsrepr": ""},
        )


def _msgpack_call(chunk_id: int) -> bytes:
    """[[chunk_id], {}, {}] in msgpack (fixarray 3, fixarray 1, uint32, fixmap 0, fixmap 0)."""
    return b"\x93\x91\xce" + chunk_id.to_bytes(4, "big") + b"\x80\x80"


def test_yaml_and_msgpack_task_bodies_are_refused_and_no_chunk_runs(
    tmp_path: Path, clean_pg: Engine, shared_worker, redis_url: str,
) -> None:
    job = make_job(clean_pg, [str(p) for p in write_jpegs(tmp_path / "images", 2)], chunk_size=2)
    worker = shared_worker()
    env, queue_name = worker.env, worker.queue
    logged = len(worker.log_text())  # the log of a shared worker: earlier tests' lines too
    marker = tmp_path / "yaml-ran"
    chunk_id = job.chunk_ids[0]
    yaml_body = (
        f"- [{chunk_id}, !!python/object/apply:pathlib.Path.touch [!!python/object/apply:"
        f"pathlib.Path ['{marker}']]]\n- {{}}\n- {{}}\n"
    ).encode()
    _publish_raw(redis_url, queue_name, yaml_body, "application/x-yaml")
    _publish_raw(redis_url, queue_name, _msgpack_call(chunk_id), "application/x-msgpack")

    refusal = "Refusing to deserialize untrusted content of type {}"
    wait_for(lambda: all(refusal.format(t) in worker.log_text()[logged:]
                         for t in ("yaml", "msgpack")),
             30, "both refusals", on_timeout=worker.tail)
    client = redis.Redis.from_url(redis_url)
    assert client.llen(queue_name) == 0
    client.close()
    assert not marker.exists()
    (chunk,) = chunk_rows(clean_pg, job.job_id)
    assert (chunk.state, chunk.deliveries, chunk.attempts) == ("pending", 0, 0)

    send(env, clean_pg, job.chunk_ids)  # the same worker is alive and runs the JSON message
    assert wait_job_end(clean_pg, job.job_id, worker) == "done"
    assert set(detections_per_capture(clean_pg, job.job_id).values()) == {BOXES_PER_IMAGE}


@pytest.mark.subprocess  # the installed entry point: exit code 1, one line, no password
@pytest.mark.parametrize(
    ("variable", "value", "command"),
    [
        ("TRAPQ_DATABASE_URL", "mysql://root:db-Secret-1@127.0.0.1/trapq", "status"),
        ("TRAPQ_DATABASE_URL", "127.0.0.1:5432/trapq", "status"),
        ("TRAPQ_BROKER_URL", "http://:broker-Secret-2@127.0.0.1:6379/0", "status"),
        ("TRAPQ_BROKER_URL", "redis//127.0.0.1", "worker"),
    ],
)
def test_a_url_setting_with_a_wrong_scheme_is_a_one_line_cli_error(
    variable: str, value: str, command: str, tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAPQ_")}
    env.update({"TRAPQ_DATA_DIR": str(tmp_path), variable: value})
    out = installed_trapq(env, command, timeout=60)
    assert variable in one_line_error(out)
    assert "Secret" not in out.stderr + out.stdout


@pytest.fixture
def confined(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """An allowed folder of images and an outside folder with a valid image too."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    write_jpegs(allowed, 2)
    write_jpegs(outside, 1)
    (allowed / "link.jpg").symlink_to(outside / "img00000.jpg")
    yield allowed, outside


def test_fetching_is_confined_to_allowed_schemes_roots_and_hosts_in_the_worker(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory,
    confined: tuple[Path, Path],
) -> None:
    allowed, outside = confined
    with ImageServer() as server:
        port = server.url.rsplit(":", 1)[1]
        ok = [
            str(allowed / "img00000.jpg"),
            (allowed / "img00001.jpg").as_uri(),
            f"{server.url}/img/1.jpg",
        ]
        refused = {
            str(outside / "img00000.jpg"): "outside the allowed roots",
            f"{allowed}/../outside/img00000.jpg": "outside the allowed roots",
            str(allowed / "link.jpg"): "outside the allowed roots",
            "/etc/passwd": "outside the allowed roots",
            f"http://localhost:{port}/img/2.jpg": "host localhost is not allowed",
            f"{server.url}/redirect?to=http://localhost:{port}/img/3.jpg":
                "host localhost is not allowed",
            f"{server.url}/redirect?to=file:///etc/passwd": "redirect to scheme file",
            f"ftp://127.0.0.1:{port}/img/4.jpg": "scheme ftp:// is not allowed",
            "gopher://127.0.0.1/x.jpg": "scheme gopher:// is not allowed",
        }
        job = make_job(clean_pg, ok + list(refused), chunk_size=6)
        env = worker_env(
            service_env,
            TRAPQ_ALLOWED_ROOTS=json.dumps([str(allowed)]),
            TRAPQ_ALLOWED_HOSTS=json.dumps(["127.0.0.1"]),
            TRAPQ_ALLOWED_SCHEMES=json.dumps(["file", "http", "https"]),
        )
        worker = worker_factory(env).start()
        send(env, clean_pg, job.chunk_ids)
        assert wait_job_end(clean_pg, job.job_id, worker) == "done"
        hosts_asked = list(server.hosts)

    with clean_pg.connect() as conn:
        rows = conn.execute(text(
            "SELECT c.uri, i.state, i.error_kind, i.error FROM job_captures i "
            "JOIN captures c ON c.id = i.capture_id WHERE i.job_id = :j"
        ), {"j": job.job_id}).all()
    by_uri = {uri: (state, kind, error) for uri, state, kind, error in rows}
    for uri in ok:
        assert by_uri[uri][0] == "done", (uri, by_uri[uri])
    for uri, phrase in refused.items():
        state, kind, error = by_uri[uri]
        assert (state, kind) == ("failed", "forbidden"), (uri, by_uri[uri])
        assert phrase in error, (uri, error)
    assert not any(h.startswith("localhost") for h in hosts_asked), hosts_asked


class _PubSubRecorder:
    """Everything published on a Redis server (task events that Flower reads included)."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub()
        self.pubsub.psubscribe("*")
        self.messages: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self.pubsub.get_message(timeout=0.2)
            if msg and isinstance(msg.get("data"), bytes):
                self.messages.append(msg["data"])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pubsub.close()
        self.client.close()


def _readable(raw: bytes) -> str:
    """The raw bytes and, for a Kombu message, its base64 body decoded (task args live there)."""
    text_ = raw.decode(errors="replace")
    try:
        message = json.loads(raw)
    except ValueError:
        return text_
    if isinstance(message, dict) and isinstance(message.get("body"), str):
        if message.get("properties", {}).get("body_encoding") == "base64":
            text_ += "\n" + base64.b64decode(message["body"]).decode(errors="replace")
    return text_


def _everything_in_redis(url: str) -> list[bytes]:
    client = redis.Redis.from_url(url)
    parts: list[bytes] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        parts.append(key)
        if kind == b"string":
            parts.append(client.get(key) or b"")
        elif kind == b"list":
            parts += client.lrange(key, 0, -1)
        elif kind == b"hash":
            parts += [k + b"=" + v for k, v in client.hgetall(key).items()]
        elif kind == b"zset":
            parts += client.zrange(key, 0, -1)
        elif kind == b"set":
            parts += list(client.smembers(key))
    client.close()
    return parts


def test_no_password_in_logs_cli_output_job_rows_or_task_messages(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory,
) -> None:
    pg_secret, redis_secret = f"pg-{uuid.uuid4().hex}", f"rd-{uuid.uuid4().hex}"
    # PostgreSQL here trusts loopback, so it accepts the password it is given; Redis checks it.
    pg_url = make_url(service_env["TRAPQ_DATABASE_URL"]).set(password=pg_secret)
    images = tmp_path / "images"
    write_jpegs(images, 4)
    with redis_server(tmp_path / "redis", password=redis_secret) as broker:
        env = worker_env(
            service_env,
            TRAPQ_DATABASE_URL=pg_url.render_as_string(hide_password=False),
            TRAPQ_BROKER_URL=broker.url,
            TRAPQ_RESULT_BACKEND=broker.url.replace("/0", "/1"),
        )
        outputs = [trapq(env, "import", str(images), "-d", "secret-test")]
        outputs.append(trapq(env, "enqueue", "secret-test", "--chunk-size", "2"))
        assert outputs[-1].returncode == 0, outputs[-1].stderr
        job_id = int(outputs[-1].stdout.strip())
        queued = _everything_in_redis(broker.url)
        recorder = _PubSubRecorder(broker.url)
        try:
            worker = worker_factory(env).start()
            assert wait_job_end(clean_pg, job_id, worker) == "done"
            worker.stop()
        finally:
            recorder.close()
        outputs += [trapq(env, "status", str(job_id)), trapq(env, "status"),
                    trapq(env, "deployments")]
        stored = _everything_in_redis(broker.url) + _everything_in_redis(
            broker.url.replace("/0", "/1"))
        wrong_port = pg_url.set(port=1).render_as_string(hide_password=False)
        outputs.append(trapq({**env, "TRAPQ_DATABASE_URL": wrong_port}, "status"))
        assert outputs[-1].returncode == 1 and "cannot use the database" in outputs[-1].stderr
        broker.stop()
        outputs.append(trapq(env, "enqueue", "secret-test"))
        assert outputs[-1].returncode == 1 and "cannot reach the broker" in outputs[-1].stderr

    with clean_pg.connect() as conn:
        rows = conn.execute(text("SELECT pipeline::text FROM jobs")).scalars().all()
        chunk_errors = conn.execute(text("SELECT coalesce(error, '') FROM chunks")).scalars().all()
    seen = {
        "worker log": worker.log_text(),
        "CLI output": "\n".join(o.stdout + o.stderr for o in outputs),
        "job pipeline JSON": "\n".join(rows),
        "chunk errors": "\n".join(chunk_errors),
        "queued task messages": "\n".join(map(_readable, queued)),
        "Redis after the run (results, task meta)": "\n".join(map(_readable, stored)),
        "published events (what Flower reads)": "\n".join(map(_readable, recorder.messages)),
    }
    assert recorder.messages, "no task events seen; the recorder heard nothing"
    assert "task-succeeded" in seen["published events (what Flower reads)"]
    assert PROCESS_CHUNK in seen["queued task messages"]
    for where, content in seen.items():
        assert pg_secret not in content, f"the PostgreSQL password is in the {where}"
        assert redis_secret not in content, f"the Redis password is in the {where}"


@pytest.mark.subprocess
def test_a_worker_refusing_a_bad_url_setting_does_not_print_its_password(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAPQ_")}
    env.update(TRAPQ_DATA_DIR=str(tmp_path),
               TRAPQ_BROKER_URL="amqps://guest:worker-Secret-3@127.0.0.1:5671//")
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks", "worker"], env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "TRAPQ_BROKER_URL must start with" in out.stdout + out.stderr
    assert "worker-Secret-3" not in out.stdout + out.stderr
