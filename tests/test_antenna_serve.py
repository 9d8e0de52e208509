"""`trapq serve`, Antenna's push API: what it tells Antenna, and what it refuses before any
work is made: unknown pipelines, missing tokens, oversized requests, and every image it must
not make trapq read (local files, loopback, private and link-local addresses, hosts off
TRAPQ_ALLOWED_HOSTS), at the URL given and at every redirect the worker meets; request
detections are classified without detecting, over real HTTP with real workers."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

import inference.fetch
from inference.fetch import Fetcher, FetchPolicy
from inference.types import ErrorKind, ItemFailure
from tasks.antenna.answers import ServedPipeline
from tasks.antenna.schemas import PipelineResultsResponse
from tasks.antenna.served import served_pipelines
from tasks.antenna.service import create_app, refusal
from tasks.antenna.settings import ServeSettings
from tasks.pipeline import pipeline_spec
from tasks.settings import Settings
from tasks.store import ready_session_factory
from tests.antenna_mock import Images, read_as_antenna
from tests.local_http import serving
from tests.services import free_port
from tests.trapq_cli import TRAPQ
from tests.worker_jobs import BOXES_PER_IMAGE, settings_of, worker_env

SLUG = "trapq-default-v1"


def settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path, detector="constant_boxes", classifier="demo_classifier",
        **overrides,
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> list[ServedPipeline]:
    """The settings' pipeline as `default@1` (hashing the weights costs seconds: once)."""
    spec = pipeline_spec(settings(tmp_path_factory.mktemp("spec")))
    return [ServedPipeline("default", 1, spec.fingerprint(), spec.to_dict())]


def client(tmp_path: Path, served: list[ServedPipeline], *, token: str = "",
           ready: str | None = None, **overrides: object) -> TestClient:
    serve = ServeSettings(
        _env_file=None, token=SecretStr(token), max_images=3, max_request_kb=4,  # type: ignore[call-arg]
    )
    return TestClient(create_app(settings(tmp_path, **overrides), serve, served, lambda: ready))


def request(*urls: str, pipeline: str = SLUG) -> dict[str, object]:
    return {"pipeline": pipeline,
            "source_images": [{"id": str(i), "url": u} for i, u in enumerate(urls)]}


def test_info_offers_the_pipeline_with_its_category_maps(
    tmp_path: Path, served: list[ServedPipeline]
) -> None:
    api = client(tmp_path, served)
    body = api.get("/info").json()
    [pipeline] = body["pipelines"]
    assert pipeline["slug"] == SLUG and pipeline["version"] == 1
    tasks_of = {a["task_type"] for a in pipeline["algorithms"]}
    assert tasks_of == {"detection", "classification"}
    classifier = next(a for a in body["algorithms"] if a["name"] == "demo_classifier")
    assert classifier["category_map"]["labels"], "the labels are registered once, here"
    assert api.get("/livez").status_code == 200


def test_readyz_says_why_the_pool_cannot_answer(
    tmp_path: Path, served: list[ServedPipeline]
) -> None:
    assert client(tmp_path, served).get("/readyz").json()["pipelines"] == [SLUG]
    down = client(tmp_path, served, ready="no worker consumes the queue gpu").get("/readyz")
    assert down.status_code == 503 and "no worker" in down.json()["detail"]


def test_unknown_pipeline_is_422_naming_the_known_ones(
    tmp_path: Path, served: list[ServedPipeline]
) -> None:
    answer = client(tmp_path, served).post("/process", json=request("https://example.org/a.jpg",
                                                            pipeline="panama_moths_2023"))
    assert answer.status_code == 422 and SLUG in answer.json()["detail"]


def test_a_required_token_is_checked(
    tmp_path: Path, served: list[ServedPipeline]
) -> None:
    api = client(tmp_path, served, token="s3cret-token")
    assert api.get("/info").status_code == 401
    assert api.get("/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert api.get("/info", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    assert api.get("/livez").status_code == 200, "probes need no token"


def test_requests_are_bounded_in_images_and_bytes(
    tmp_path: Path, served: list[ServedPipeline]
) -> None:
    api = client(tmp_path, served)
    too_many = api.post("/process", json=request(*["https://example.org/a.jpg"] * 4))
    assert too_many.status_code == 422 and "1 to 3" in too_many.json()["detail"]
    huge = api.post("/process", json=request("https://example.org/" + "a" * 5000 + ".jpg"))
    assert huge.status_code == 413


@pytest.mark.parametrize("url, why", [
    ("file:///etc/passwd", "TRAPQ_ALLOWED_ROOTS"),
    ("/etc/passwd", "scheme"),
    ("s3://bucket/key.jpg", "scheme"),
    ("http://127.0.0.1:6379/", "internal"),
    ("http://localhost/a.jpg", "internal"),
    ("http://10.1.2.3/a.jpg", "internal"),
    ("http://192.168.0.10/a.jpg", "internal"),
    ("http://169.254.169.254/latest/meta-data/", "internal"),
    ("http://[::1]/a.jpg", "internal"),
])
def test_images_it_must_not_read_are_refused_before_any_work(
    tmp_path: Path, served: list[ServedPipeline], url: str, why: str
) -> None:
    answer = client(tmp_path, served).post("/process", json=request(url))
    assert answer.status_code == 422 and why in answer.json()["detail"]


def test_allowed_hosts_and_roots_open_exactly_what_they_name(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    s = settings(tmp_path, allowed_hosts=["images.example.org"], allowed_roots=[images])
    assert refusal("https://images.example.org/a.jpg", s) is None
    assert "not allowed" in (refusal("https://other.example.org/a.jpg", s) or "")
    assert refusal((images / "a.jpg").as_uri(), s) is None
    assert refusal((images / ".." / "secret.jpg").as_uri(), s) is not None


@pytest.mark.slow
def test_process_answers_through_the_fast_lane_with_every_image_accounted_for(
    tmp_path: Path, service_env: dict[str, str], worker_factory,
) -> None:
    """A real worker and dispatcher: good images are listed with their boxes, a missing one
    is named in `errors` and not listed (it was not processed)."""
    env = worker_env(service_env, TRAPQ_ALLOWED_HOSTS='["127.0.0.1"]')
    worker_factory(env).start()
    worker_factory(env, argv=[sys.executable, "-m", "tasks.dispatcher"]).start(
        ready="dispatching")
    s = settings_of(env).model_copy(update={
        "detector": "constant_boxes", "classifier": "demo_classifier", "random_weights": True,
        "allowed_hosts": ["127.0.0.1"],
    })
    served = served_pipelines(s, ready_session_factory(s), ["default"])
    serve = ServeSettings(_env_file=None)  # type: ignore[call-arg]
    api = TestClient(create_app(s, serve, served, lambda: None))
    with serving(Images) as images:
        answer = api.post("/process", json=request(f"{images}/img/1.jpg", f"{images}/img/2.jpg",
                                               f"{images}/missing/3.jpg",
                                               pipeline=served[0].slug))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [i["id"] for i in body["source_images"]] == ["0", "1"]
    assert {d["source_image_id"] for d in body["detections"]} == {"0", "1"}
    assert len(body["detections"]) == 2 * BOXES_PER_IMAGE
    assert all(c["terminal"] for d in body["detections"] for c in d["classifications"])
    [error] = body["errors"]
    assert error.startswith("image 2:") and "404" in error


def test_a_redirect_never_leads_a_worker_from_a_public_host_inward(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no allowed hosts (the push API then admits only public URLs), every hop after
    the first is checked too: the image server stands in for a public host (127.0.0.1
    counted public), `localhost` is what it is, loopback."""
    internal = inference.fetch._internal_address
    monkeypatch.setattr(inference.fetch, "_internal_address",
                        lambda host: None if host == "127.0.0.1" else internal(host))
    fetcher = Fetcher(FetchPolicy(allowed_schemes=("http", "https")))
    with serving(Images) as images:
        port = images.rsplit(":", 1)[1]
        assert fetcher.fetch(f"{images}/redirect?to={images}/img/1.jpg")[:2] == b"\xff\xd8"
        for target, phrase in [
            (f"http://localhost:{port}/img/1.jpg", "internal address (127.0.0.1)"),
            ("http://169.254.169.254/latest/meta-data/", "internal address (169.254.169.254)"),
            ("file:///etc/passwd", "redirect to scheme file"),
            (f"{images}/redirect?to=http://localhost:{port}/img/2.jpg", "internal address"),
        ]:
            with pytest.raises(ItemFailure) as refused:
                fetcher.fetch(f"{images}/redirect?to={target}")
            assert refused.value.kind == ErrorKind.FORBIDDEN and phrase in refused.value.message


@pytest.mark.slow
def test_process_classifies_request_detections_and_refuses_redirects_at_every_hop(
    tmp_path: Path, service_env: dict[str, str], worker_factory,
) -> None:
    """`trapq serve` over real HTTP, a worker and a dispatcher, the demo classifier's own
    weights (a registered category map): an image sent with boxes gets exactly those boxes
    back, classified, under the algorithm that found them; an image without is detected;
    redirects off the allowed hosts or to a file fail their image alone."""
    env = worker_env(service_env, TRAPQ_RANDOM_WEIGHTS="false",
                     TRAPQ_ALLOWED_HOSTS='["127.0.0.1"]')
    worker_factory(env).start()
    worker_factory(env, argv=[sys.executable, "-m", "tasks.dispatcher"]).start(
        ready="dispatching")
    port = free_port()
    worker_factory(env, argv=[str(TRAPQ), "serve", "--port", str(port)]).start(
        ready="Uvicorn running")
    base = f"http://127.0.0.1:{port}"
    info = httpx.get(f"{base}/info", timeout=30).json()
    maps = {a["key"]: a["category_map"]["labels"] for a in info["algorithms"]
            if a.get("category_map")}
    boxes = [{"x1": 4.0, "y1": 6.0, "x2": 40.5, "y2": 30.25},
             {"x1": 60.0, "y1": 50.0, "x2": 150.0, "y2": 110.0}]
    found_by = {"name": "Antenna's detector", "key": "antenna-detector-2024"}
    with serving(Images) as images:
        image_port = images.rsplit(":", 1)[1]
        sent = [{"id": "0", "url": f"{images}/img/1.jpg"},
                {"id": "1", "url": f"{images}/img/2.jpg"},
                {"id": "2", "url": f"{images}/redirect?to=http://localhost:{image_port}/img/3"},
                {"id": "3", "url": f"{images}/redirect?to=file:///etc/passwd"}]
        reply = httpx.post(f"{base}/process", timeout=200, json={
            "pipeline": info["pipelines"][0]["slug"], "source_images": sent,
            "detections": [{"source_image": sent[0], "bbox": b, "algorithm": found_by}
                           for b in boxes],
        })
    assert reply.status_code == 200, reply.text
    result = PipelineResultsResponse.model_validate(reply.json())
    assert [i.id for i in result.source_images] == ["0", "1"]
    given = [d for d in result.detections if d.source_image_id == "0"]
    assert [d.bbox.model_dump() for d in given if d.bbox] == boxes, "the boxes sent, no others"
    assert {d.algorithm.key for d in given} == {found_by["key"]}
    detected = [d for d in result.detections if d.source_image_id == "1"]
    assert len(detected) == BOXES_PER_IMAGE and found_by["key"] not in {
        d.algorithm.key for d in detected}
    saved, problems = read_as_antenna(result, maps)
    assert problems == [] and len(saved) == len(boxes) + BOXES_PER_IMAGE
    errors = result.errors
    assert isinstance(errors, list) and len(errors) == 2
    assert errors[0].startswith("image 2:") and "host localhost is not allowed" in errors[0]
    assert errors[1].startswith("image 3:") and "redirect to scheme file" in errors[1]
