"""The Antenna client against the mock Antenna over real HTTP: the requests it makes pass
Antenna's contract, answers are split under the POST limit and after a 413, and a refused
token, a queue outage or an unreachable Antenna end the way the bridge needs."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from tasks.antenna.client import AntennaAuthError, AntennaClient, AntennaUnavailable
from tasks.antenna.schemas import (
    AlgorithmConfig,
    AlgorithmReference,
    BoundingBox,
    ClassificationResponse,
    DetectionResponse,
    PipelineConfig,
    PipelineResultsResponse,
    SourceImage,
    TaskResult,
)
from tests.antenna_mock import AntennaMock

SLUG = "trapq-default-v1"
DET = AlgorithmReference(name="constant_boxes", key="constant_boxes-0")
CLS = AlgorithmReference(name="demo_classifier", key="demo_classifier-0")


@pytest.fixture
def mock() -> Iterator[AntennaMock]:
    server = AntennaMock().start()
    yield server
    server.stop()


def client_of(mock: AntennaMock, **kwargs: object) -> AntennaClient:
    return AntennaClient(mock.url, mock.token, timeout_s=10, **kwargs)  # type: ignore[arg-type]


def register(mock: AntennaMock, client: AntennaClient, project: int = 1) -> None:
    config = PipelineConfig(name="trapq default", slug=SLUG, version=1, algorithms=[
        AlgorithmConfig(name=DET.name, key=DET.key, task_type="detection"),
        AlgorithmConfig(name=CLS.name, key=CLS.key, task_type="classification"),
    ])
    client.register(project, "trapq (test)", [config])


def answer(subject: str, image_id: str, n_detections: int) -> TaskResult:
    now = datetime.now(UTC)
    detections = [
        DetectionResponse(
            source_image_id=image_id, bbox=BoundingBox(x1=i, y1=i, x2=i + 10, y2=i + 10),
            algorithm=DET, timestamp=now,
            classifications=[ClassificationResponse(
                classification="moth", scores=[0.9, 0.05, 0.01, 0.01, 0.01],
                algorithm=CLS, timestamp=now,
            )],
        )
        for i in range(n_detections)
    ]
    return TaskResult(reply_subject=subject, result=PipelineResultsResponse(
        pipeline=SLUG, total_time=0.1, source_images=[SourceImage(id=image_id, url="u")],
        detections=detections,
    ))


def test_register_find_take_and_answer_pass_the_contract(mock: AntennaMock) -> None:
    client = client_of(mock)
    register(mock, client)
    job = mock.add_job(1, SLUG, [(str(i), f"http://images/{i}.jpg") for i in range(3)])
    mock.add_job(2, SLUG, [("9", "http://images/9.jpg")])  # another project's
    assert [j.id for j in client.jobs(1, [SLUG])] == [job]
    tasks, bad = client.take_tasks(job, 10)
    assert len(tasks) == 3 and bad == []
    report = client.post_results(job, [answer(t.reply_subject or "", t.image_id, 2)
                                       for t in tasks], {})
    assert sorted(report.posted) == sorted(t.reply_subject for t in tasks)
    assert mock.finished(job) and mock.problems == []
    assert client.jobs(1, [SLUG]) == [], "a finished job is no longer listed"


def test_malformed_tasks_are_set_apart_with_their_reason(mock: AntennaMock) -> None:
    client = client_of(mock)
    job = mock.add_job(1, SLUG, [("1", "http://images/1.jpg")], raw_tasks=[
        {"id": "a", "image_id": "2"},  # no image_url
        {"id": "b", "image_id": "3", "image_url": "file:///etc/passwd"},
    ])
    tasks, bad = client.take_tasks(job, 10)
    assert [t.image_id for t in tasks] == ["1"]
    reasons = {b.image_id: b.error for b in bad}
    assert "image_url" in reasons["2"] and "http(s)" in reasons["3"]


def test_answers_are_split_under_the_post_limit(mock: AntennaMock) -> None:
    limit = 20_000
    client = client_of(mock, max_post_bytes=limit)
    register(mock, client)
    job = mock.add_job(1, SLUG, [(str(i), f"http://images/{i}.jpg") for i in range(12)])
    tasks, _ = client.take_tasks(job, 12)
    report = client.post_results(job, [answer(t.reply_subject or "", t.image_id, 20)
                                       for t in tasks], {})
    assert len(report.posted) == 12
    posts = mock.result_posts()
    assert len(posts) > 1 and max(p.size for p in posts) <= limit
    assert mock.finished(job) and mock.problems == []


def test_a_413_splits_the_body_and_an_answer_too_large_alone_becomes_an_error(
    mock: AntennaMock,
) -> None:
    mock.max_body_bytes = 15_000  # Antenna's proxy is stricter than trapq's own limit
    client = client_of(mock, max_post_bytes=10**6)
    register(mock, client)
    job = mock.add_job(1, SLUG, [(str(i), f"http://images/{i}.jpg") for i in range(6)])
    tasks, _ = client.take_tasks(job, 6)
    sizes = [2] * 5 + [200]  # the last one is over the proxy's limit on its own
    report = client.post_results(job, [answer(t.reply_subject or "", t.image_id, n)
                                       for t, n in zip(tasks, sizes, strict=True)], {})
    assert len(report.posted) == 6 and len(report.too_large) == 1
    statuses = [p.body is None for p in mock.result_posts()]
    assert statuses[0] is True, "the first, whole body was refused"
    answers = mock.answers(job)
    assert all(len(a) == 1 for a in answers.values()) and mock.problems == []
    big = answers[tasks[-1].id][0]
    assert "larger than" in big["error"] and big["image_id"] == tasks[-1].image_id


def test_a_refused_token_is_one_line_without_the_token(mock: AntennaMock) -> None:
    client = AntennaClient(mock.url, "wrong-token-abcdef", timeout_s=10)
    with pytest.raises(AntennaAuthError) as e:
        client.jobs(1, [SLUG])
    assert "401" in str(e.value) and "wrong-token" not in str(e.value)
    assert "\n" not in str(e.value)


def test_queue_outage_and_unreachable_antenna_are_unavailable(mock: AntennaMock) -> None:
    client = client_of(mock)
    job = mock.add_job(1, SLUG, [("1", "http://images/1.jpg")])
    mock.unavailable_tasks = 1
    with pytest.raises(AntennaUnavailable, match="503"):
        client.take_tasks(job, 5)
    tasks, _ = client.take_tasks(job, 5)
    assert len(tasks) == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    gone = AntennaClient(f"http://127.0.0.1:{port}/api/v2", mock.token, timeout_s=2)
    with pytest.raises(AntennaUnavailable, match="cannot reach"):
        gone.jobs(1, [SLUG])
    report = gone.post_results(job, [answer(tasks[0].reply_subject or "", "1", 1)], {})
    assert report.not_sent == [tasks[0].reply_subject] and report.posted == []
