"""S3 in: `trapq import s3://bucket/prefix` and workers fetching s3:// captures, against moto's
standalone server on a loopback port (a real S3 HTTP API; boto3 is configured by the
environment exactly as it would be for MinIO); timeouts and retries against an endpoint of
the tests' own that fails or goes silent on cue."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import jsonschema
import pytest
from moto.server import ThreadedMotoServer
from sqlalchemy import Engine, select, text

from db.deployments import DeploymentMetadata, set_metadata
from db.imports import get_or_create_deployment, insert_captures
from db.models import Capture, JobCapture
from db.results import write_results
from db.session import make_sessionmaker
from inference.fetch import Fetcher, FetchPolicy
from inference.types import Detection, ErrorKind, ItemFailure, ItemResult
from tests.local_http import QuietHandler, serving
from tests.services import free_port
from tests.trapq_cli import one_line_error, trapq
from tests.worker_jobs import (
    detections_per_capture,
    job_state,
    jpeg_bytes,
    plan_job,
    send,
    worker_env,
)
from tests.worker_process import wait_for

KEYS = {"AWS_ACCESS_KEY_ID": "trapq-test", "AWS_SECRET_ACCESS_KEY": "trapq-secret",
        "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint: str) -> Any:
    """A client of the test itself; each test makes its own buckets."""
    return boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=KEYS[
        "AWS_ACCESS_KEY_ID"], aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1")


@pytest.fixture
def s3_env(service_env: dict[str, str], s3_endpoint: str) -> dict[str, str]:
    """What a user sets for MinIO: the endpoint and the keys (no ~/.aws, no instance metadata)."""
    return service_env | KEYS | {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def uris(engine: Engine, deployment: str) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(text(
            "SELECT c.uri FROM captures c JOIN deployments d ON d.id = c.deployment_id "
            "WHERE d.name = :name ORDER BY c.uri"), {"name": deployment}))


@pytest.mark.heavy
def test_import_pages_through_more_than_a_thousand_keys_once(
    s3: Any, s3_env: dict[str, str], clean_pg: Engine
) -> None:
    s3.create_bucket(Bucket="traps")
    keys = [f"night-1/cam-{'ab'[i % 2]}/img{i:05d}.JPG" for i in range(1050)]
    for key in keys:
        s3.put_object(Bucket="traps", Key=key, Body=b"x")
    s3.put_object(Bucket="traps", Key="night-1/notes.txt", Body=b"not an image")
    s3.put_object(Bucket="traps", Key="night-2/img00000.jpg", Body=b"x")

    first = trapq(s3_env, "import", "s3://traps/night-1/", "--deployment", "n1")
    again = trapq(s3_env, "import", "s3://traps/night-1/", "--deployment", "n1")
    only_b = trapq(s3_env, "import", "s3://traps/night-1", "--deployment", "n1-b",
                   "--pattern", r"/cam-b/")

    assert first.returncode == 0, first.stderr
    assert "1050 captures added, 0 already recorded" in first.stdout
    assert "0 captures added, 1050 already recorded" in again.stdout
    assert uris(clean_pg, "n1") == sorted(f"s3://traps/{k}" for k in keys)
    assert only_b.returncode == 0, only_b.stderr
    assert uris(clean_pg, "n1-b") == sorted(f"s3://traps/{k}" for k in keys if "/cam-b/" in k)


def test_missing_credentials_bucket_or_pattern_are_one_line_errors(
    s3: Any, s3_env: dict[str, str], clean_pg: Engine
) -> None:
    s3.create_bucket(Bucket="empty-traps")
    no_keys = {k: v for k, v in s3_env.items() if k not in KEYS}
    anonymous = trapq(no_keys, "import", "s3://empty-traps/x/", "--deployment", "d")
    no_bucket = trapq(s3_env, "import", "s3://no-such-bucket/x/", "--deployment", "d")
    nothing = trapq(s3_env, "import", "s3://empty-traps/x/", "--deployment", "d")
    bad_pattern = trapq(s3_env, "import", "s3://empty-traps/", "--deployment", "d",
                        "--pattern", "(")

    assert "no S3 credentials" in one_line_error(anonymous)
    assert "no bucket 'no-such-bucket'" in one_line_error(no_bucket)
    assert "no captures found in s3://empty-traps/x/" in one_line_error(nothing)
    assert "--pattern '(' is not a regular expression" in one_line_error(bad_pattern)
    with clean_pg.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM deployments")) == 0


def test_fetcher_reads_objects_within_its_byte_limit(
    s3: Any, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ENDPOINT_URL", *KEYS):
        monkeypatch.setenv(name, s3_env[name])
    s3.create_bucket(Bucket="fetch")
    s3.put_object(Bucket="fetch", Key="ok.jpg", Body=b"\xff\xd8 bytes")
    s3.put_object(Bucket="fetch", Key="big.jpg", Body=b"z" * 5000)
    fetcher = Fetcher(FetchPolicy(max_image_bytes=4096, http_read_timeout_s=2.0))

    assert fetcher.fetch("s3://fetch/ok.jpg") == b"\xff\xd8 bytes"
    for uri, kind in (("s3://fetch/big.jpg", ErrorKind.TOO_LARGE),
                      ("s3://fetch/gone.jpg", ErrorKind.MISSING),
                      ("s3://no-bucket/a.jpg", ErrorKind.MISSING)):
        with pytest.raises(ItemFailure) as info:
            fetcher.fetch(uri)
        assert info.value.kind == kind and uri in info.value.message


def test_a_worker_processes_s3_captures_and_a_missing_key_fails_alone(
    tmp_path: Path, s3: Any, s3_env: dict[str, str], clean_pg: Engine,
    worker_factory,
) -> None:
    s3.create_bucket(Bucket="night")
    for i in range(4):
        s3.put_object(Bucket="night", Key=f"n3/img{i}.jpg", Body=jpeg_bytes(160, 120, seed=i))
    imported = trapq(s3_env, "import", "s3://night/n3/", "--deployment", "n3")
    assert imported.returncode == 0, imported.stderr
    s3.delete_object(Bucket="night", Key="n3/img2.jpg")  # gone between import and processing
    factory = make_sessionmaker(clean_pg)
    with factory.begin() as s:
        dep = s.scalar(text("SELECT id FROM deployments WHERE name = 'n3'"))
        plan = plan_job(s, dep, chunk_size=4)
    env = worker_env(s3_env)
    worker = worker_factory(env).start()
    send(env, clean_pg, plan.chunk_ids)
    wait_for(lambda: job_state(clean_pg, plan.job_id) == "done", 120, "job done",
             on_timeout=worker.tail)

    with factory() as s:
        items = {uri: (state, kind, error, w, h) for uri, state, kind, error, w, h in s.execute(
            select(Capture.uri, JobCapture.state, JobCapture.error_kind, JobCapture.error,
                   Capture.width, Capture.height)
            .join(Capture, Capture.id == JobCapture.capture_id)
            .where(JobCapture.job_id == plan.job_id))}
    assert items.pop("s3://night/n3/img2.jpg")[:3] == (
        "failed", "missing", "no such object: s3://night/n3/img2.jpg")
    assert set(items.values()) == {("done", None, None, 160, 120)}  # sizes recorded at decode
    assert len(detections_per_capture(clean_pg, plan.job_id)) == 3

    out = tmp_path / "md.json"
    exported = trapq(s3_env, "export", str(plan.job_id), "--format", "megadetector",
                     "--root", "s3://night/n3", "-o", str(out))
    assert exported.returncode == 0, exported.stderr
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, json.loads(
        (Path(__file__).parent / "schemas" / "megadetector-batch-output.schema.json").read_text()))
    images = {image["file"]: image for image in doc["images"]}
    assert sorted(images) == ["img0.jpg", "img1.jpg", "img2.jpg", "img3.jpg"]
    assert images["img2.jpg"]["failure"] == "no such object: s3://night/n3/img2.jpg"
    assert all(len(images[f"img{i}.jpg"]["detections"]) > 0 for i in (0, 1, 3))


def test_exports_upload_to_a_bucket_and_a_missing_one_is_a_one_line_error(
    s3: Any, s3_env: dict[str, str], clean_pg: Engine
) -> None:
    s3.create_bucket(Bucket="results")
    factory = make_sessionmaker(clean_pg)
    with factory.begin() as s:
        dep = get_or_create_deployment(s, "up")
        set_metadata(s, "up", DeploymentMetadata(latitude=1.0, longitude=2.0,
                                                  capture_method="activityDetection"))
        insert_captures(s, dep, [{"uri": "s3://night/up/a.jpg", "width": 100, "height": 50,
                                  "captured_at": datetime(2024, 6, 1, tzinfo=UTC)}])
        plan = plan_job(s, dep, chunk_size=1)
        (capture_id,) = s.scalars(select(Capture.id))
    with factory.begin() as s:
        write_results(s, plan.job_id, [ItemResult(capture_id, "s3://night/up/a.jpg", 100, 50, [
            Detection(10, 10, 30, 20, 0.9, "insect")])])
    job = str(plan.job_id)

    coco = trapq(s3_env, "export", job, "--format", "coco", "-o", "s3://results/up/coco.json")
    package = trapq(s3_env, "export", job, "--format", "camtrapdp", "-o", "s3://results/up/dp",
                    "--project-title", "P", "--sampling-design", "targeted",
                    "--contributor", "A <a@example.org>")
    nowhere = trapq(s3_env, "export", job, "--format", "coco", "-o", "s3://no-bucket/c.json")

    assert coco.returncode == 0 and package.returncode == 0, coco.stderr + package.stderr
    listed = s3.list_objects_v2(Bucket="results", Prefix="up/")["Contents"]
    assert sorted(o["Key"] for o in listed) == [
        "up/coco.json", "up/dp/datapackage.json", "up/dp/deployments.csv", "up/dp/media.csv",
        "up/dp/observations.csv"]
    body = json.loads(s3.get_object(Bucket="results", Key="up/coco.json")["Body"].read())
    assert [a["bbox"] for a in body["annotations"]] == [[10, 10, 20, 10]]
    assert "no bucket 'no-bucket'" in one_line_error(nowhere)


class FlakyS3:
    """An S3 endpoint of the test's own that answers GetObject with the statuses queued in
    `answers` (then 200 with the object), or holds each request until `release` is set:
    what a worker meets when S3 throttles, fails for a moment, or goes silent."""

    def __init__(self, answers: list[int], hold: bool = False) -> None:
        self.answers, self.hold = answers, hold
        self.requests = 0
        self.release = threading.Event()

    def handler(self) -> type[QuietHandler]:
        endpoint = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:  # noqa: N802
                endpoint.requests += 1
                if endpoint.hold:
                    endpoint.release.wait(60)
                status = endpoint.answers.pop(0) if endpoint.answers else 200
                if status == 200:
                    self.send_body(200, b"\xff\xd8 object", "image/jpeg")
                else:
                    self.send_body(status, b"<Error><Code>SlowDown</Code></Error>",
                                   "application/xml")

        return Handler


@pytest.fixture
def s3_fetcher(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Fetcher]:
    """A Fetcher whose S3 client talks to `url`, with a 1 s read timeout."""
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)

    def make(url: str) -> Fetcher:
        return Fetcher(FetchPolicy(http_connect_timeout_s=1.0, http_read_timeout_s=1.0,
                                   s3_options={"endpoint_url": url}))

    return make


def test_an_s3_request_failing_for_a_moment_is_retried_once_and_succeeds(
    s3_fetcher: Callable[[str], Fetcher],
) -> None:
    s3 = FlakyS3([503])
    with serving(s3.handler()) as url:
        assert s3_fetcher(url).fetch("s3://night/a.jpg") == b"\xff\xd8 object"
    assert s3.requests == 2


def test_an_s3_endpoint_failing_on_is_an_item_failure_after_two_attempts(
    s3_fetcher: Callable[[str], Fetcher],
) -> None:
    s3 = FlakyS3([503, 503, 503])
    with serving(s3.handler()) as url, pytest.raises(ItemFailure) as failed:
        s3_fetcher(url).fetch("s3://night/a.jpg")
    assert failed.value.kind == ErrorKind.HTTP_SERVER and "s3://night/a.jpg" in str(failed.value)
    assert s3.requests == 2  # one retry: the chunk's own retry handles longer outages


def test_a_silent_s3_endpoint_is_a_timeout_after_two_attempts_bounded_by_the_read_timeout(
    s3_fetcher: Callable[[str], Fetcher],
) -> None:
    s3 = FlakyS3([], hold=True)
    with serving(s3.handler()) as url:
        try:
            with pytest.raises(ItemFailure) as failed:
                s3_fetcher(url).fetch("s3://night/a.jpg")
        finally:
            s3.release.set()
    assert failed.value.kind == ErrorKind.TIMEOUT
    assert str(failed.value) == "S3 request timed out for s3://night/a.jpg"
    assert s3.requests == 2
