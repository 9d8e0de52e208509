"""`trapq antenna` against the mock Antenna, with real workers, PostgreSQL and Redis: every
task taken is answered exactly once, bad images with an error of their own, across SIGKILLs
of the bridge and of a worker, and jobs of very different sizes served side by side by
several bridges without a single redelivery (ami-data-companion #143)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from sqlalchemy import Engine, func, select

from db.models import AntennaTask, Chunk, Classification, Job, Project
from tests.antenna_mock import AntennaMock, Images
from tests.badinputs import ImageServer
from tests.local_http import serving
from tests.trapq_cli import TRAPQ, one_line_error, trapq
from tests.worker_jobs import BOXES_PER_IMAGE, kill_trial_env, worker_env
from tests.worker_process import wait_for

SLUG = "trapq-default-v1"


@pytest.fixture
def images() -> Iterator[str]:
    with serving(Images) as url:
        yield url


@pytest.fixture
def held_images() -> Iterator[ImageServer]:
    """An image host whose requests a test can hold (tests.badinputs.ImageServer)."""
    with ImageServer() as server:
        yield server


@pytest.fixture
def mock() -> Iterator[AntennaMock]:
    server = AntennaMock(ack_wait_s=60).start()
    yield server
    server.stop()


def bridge_env(env: dict[str, str], mock: AntennaMock, **overrides: str) -> dict[str, str]:
    out = dict(env)
    out.update(
        TRAPQ_ANTENNA_URL=mock.url,
        TRAPQ_ANTENNA_TOKEN=mock.token,
        TRAPQ_ANTENNA_PROJECTS="[1]",
        TRAPQ_ANTENNA_ACK_WAIT_S=str(mock.ack_wait_s),
        TRAPQ_ANTENNA_POLL_S="0.3",
        TRAPQ_ANTENNA_CHUNK_SIZE="4",
    )
    out.update(overrides)
    return out


def start_bridge(worker_factory, env: dict[str, str]):
    return worker_factory(env, argv=[str(TRAPQ), "antenna"]).start(ready="registered ")


def start_pool(worker_factory, env: dict[str, str]):
    """A worker, and the dispatcher that releases the bridge's pending chunks to it."""
    worker = worker_factory(env).start()
    worker_factory(env, argv=[sys.executable, "-m", "tasks.dispatcher"]).start(
        ready="dispatching")
    return worker


def assert_answered_once(mock: AntennaMock, job_id: int) -> dict[str, dict]:
    answers = mock.answers(job_id)
    assert all(len(a) == 1 for a in answers.values()), {k: len(v) for k, v in answers.items()}
    assert mock.problems == [] and mock.lost() == 0
    return {task: a[0] for task, a in answers.items()}


def test_mixed_good_and_bad_images_are_answered_completely_and_once(
    service_env: dict[str, str], clean_pg: Engine, worker_factory, mock: AntennaMock,
    images: str,
) -> None:
    good = [(str(i), f"{images}/img/{i}.jpg") for i in range(6)]
    bad = [("404", f"{images}/missing/404.jpg"), ("html", f"{images}/text/1.jpg")]
    job = mock.add_job(1, SLUG, good + bad, raw_tasks=[
        {"id": "no-url", "image_id": "nourl"},
        {"id": "local", "image_id": "local", "image_url": "file:///etc/passwd"},
    ])
    # The demo classifier's own weights: their labels are registered as its category map.
    env = bridge_env(worker_env(service_env, TRAPQ_RANDOM_WEIGHTS="false"), mock)
    worker = start_pool(worker_factory, env)
    bridge = start_bridge(worker_factory, env)
    wait_for(lambda: mock.finished(job), 120, "every task answered",
             on_timeout=lambda: bridge.tail() + worker.tail())

    answers = assert_answered_once(mock, job)
    [classifier] = [a for a in mock.registered[1][0].pipelines[0].algorithms
                    if a.category_map is not None]
    with clean_pg.connect() as conn:
        topk = [[tuple(pair) for pair in ranked] for ranked in conn.scalars(
            select(Classification.topk).order_by(Classification.id))]
    assert sorted(s.top_n for s in mock.saved) == sorted(ranked[:3] for ranked in topk), (
        "Antenna's top 3 of each classification are trapq's")
    assert mock.redeliveries() == 0
    for image_id, url in good:
        result = answers[f"{job}-{image_id}"]
        assert result["source_images"] == [{"id": image_id, "url": url}]
        assert len(result["detections"]) == BOXES_PER_IMAGE
        for d in result["detections"]:
            assert d["source_image_id"] == image_id and 0 <= d["bbox"]["x1"] < d["bbox"]["x2"]
            [species] = d["classifications"]
            assert species["terminal"] is True and "labels" not in species
            assert "logits" not in species
            assert len(species["scores"]) == len(classifier.category_map.labels)
    assert "404" in answers[f"{job}-404"]["error"]
    assert answers[f"{job}-html"]["image_id"] == "html"
    assert "image_url" in answers["no-url"]["error"]
    assert "http(s)" in answers["local"]["error"]
    registered = mock.registered[1][0].pipelines
    assert [p.slug for p in registered] == [SLUG]
    with clean_pg.connect() as conn:
        jobs_before = conn.scalar(select(func.count()).select_from(Job))
        projects = set(conn.scalars(select(Project.name).join(Job, Job.project_id == Project.id)))
    assert projects == {f"antenna {urlsplit(mock.url).netloc} project 1"}, "its fair share"

    # The same images in a new Antenna job: answered from SQL, no new trapq job.
    again = mock.add_job(1, SLUG, good)
    wait_for(lambda: mock.finished(again), 60, "the second job answered",
             on_timeout=bridge.tail)
    answers_again = assert_answered_once(mock, again)
    assert [answers_again[f"{again}-{i}"]["detections"] for i, _ in good] == [
        answers[f"{job}-{i}"]["detections"] for i, _ in good
    ]
    with clean_pg.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Job)) == jobs_before
    assert mock.token not in bridge.log_text()


@pytest.mark.slow
def test_sigkill_of_bridge_and_worker_still_answers_every_task_once(
    service_env: dict[str, str], clean_pg: Engine, worker_factory, mock: AntennaMock,
    held_images: ImageServer,
) -> None:
    """The last image is held by its server until the worker is killed, so a chunk is
    running then however fast the others went."""
    # Above what a killed worker's chunk takes to come back on a loaded 2-core machine: a new
    # worker's start (55 s seen) plus the 12 s visibility timeout.
    mock.ack_wait_s = 90
    held_images.hold(lambda n: n == 23)
    job = mock.add_job(1, SLUG, [(str(i), f"{held_images.url}/img/{i}.jpg") for i in range(24)])
    env = bridge_env(kill_trial_env(service_env), mock, TRAPQ_ANTENNA_FIRST_BATCH="8")
    worker = start_pool(worker_factory, env)
    bridge = start_bridge(worker_factory, env)

    def answered() -> int:
        return sum(1 for a in mock.answers(job).values() if a)

    wait_for(lambda: answered() >= 1, 90, "a first answer", on_timeout=bridge.tail)
    bridge.kill()  # mid-batch: tasks are held, chunks queued or running
    start_bridge(worker_factory, env)

    def running() -> bool:
        with clean_pg.connect() as conn:
            return bool(conn.scalar(select(func.count()).where(Chunk.state == "running")))

    # Tasks the killed bridge took but had not recorded come back after the ack wait.
    wait_for(lambda: running() and held_images.wait_held(0), mock.ack_wait_s + 60,
             "a chunk running", every=0.05, on_timeout=worker.tail)
    worker.signal(signal.SIGKILL)
    worker.kill()
    held_images.release()
    worker_factory(env).start()

    wait_for(lambda: mock.finished(job), 360, "every task answered",
             on_timeout=bridge.tail)
    assert_answered_once(mock, job)
    assert answered() == 24
    with clean_pg.connect() as conn:
        states = dict(conn.execute(
            select(AntennaTask.state, func.count()).group_by(AntennaTask.state)
        ).all())
    # A POST that landed just before the bridge was killed stays `posting`: never sent again.
    assert set(states) <= {"answered", "posting"} and sum(states.values()) == 24, states


@pytest.mark.slow
def test_jobs_of_very_different_sizes_with_two_bridges_get_no_redelivery(
    service_env: dict[str, str], clean_pg: Engine, worker_factory, mock: AntennaMock,
    images: str,
) -> None:
    """ami-data-companion #143 (10/10/100/100/500/500 images), scaled down for a CPU."""
    sizes = [2, 2, 20, 20, 100, 100]
    jobs = [
        mock.add_job(1, SLUG, [(f"{n}-{i}", f"{images}/img/{i}.jpg") for i in range(n)])
        for n in sizes
    ]
    env = bridge_env(worker_env(service_env), mock)
    start_pool(worker_factory, env)
    bridges = [start_bridge(worker_factory, env) for _ in range(2)]
    wait_for(lambda: all(mock.finished(j) for j in jobs), 400, "every job answered",
             on_timeout=lambda: "\n".join(b.tail(20) for b in bridges))
    for j in jobs:
        assert_answered_once(mock, j)
    assert mock.redeliveries() == 0 and mock.stale_answers == []


def test_a_refused_token_stops_the_bridge_with_one_line(
    service_env: dict[str, str], mock: AntennaMock,
) -> None:
    env = bridge_env(service_env, mock, TRAPQ_ANTENNA_TOKEN="not-the-token-42")
    result = trapq(env, "antenna")
    line = one_line_error(result)
    assert "401" in line and "TRAPQ_ANTENNA_TOKEN" in line and "not-the-token" not in line


@pytest.mark.slow
def test_antenna_unavailable_the_bridge_holds_no_more_tasks_and_loses_no_answer(
    service_env: dict[str, str], clean_pg: Engine, worker_factory, mock: AntennaMock,
    images: str,
) -> None:
    job = mock.add_job(1, SLUG, [(str(i), f"{images}/img/{i}.jpg") for i in range(12)])
    env = bridge_env(worker_env(service_env), mock, TRAPQ_ANTENNA_FIRST_BATCH="4",
                     TRAPQ_ANTENNA_BACKOFF_MAX_S="1")
    start_pool(worker_factory, env)
    bridge = start_bridge(worker_factory, env)

    def delivered() -> int:
        return sum(t.deliveries for t in mock.jobs[job].tasks)

    wait_for(lambda: delivered() > 0, 90, "a first batch", on_timeout=bridge.tail)
    mock.unavailable_all = True
    held = delivered()

    def states() -> dict[str, int]:
        with clean_pg.connect() as conn:
            return dict(conn.execute(
                select(AntennaTask.state, func.count()).group_by(AntennaTask.state)
            ).all())

    wait_for(lambda: set(states()) <= {"ready", "answered"} and sum(states().values()) == held,
             90, "the held tasks' answers computed", on_timeout=bridge.tail)
    wait_for(lambda: "Antenna unavailable" in bridge.log_text(), 30, "a backoff")
    assert delivered() == held, "no task taken while Antenna is unavailable"
    mock.unavailable_all = False
    wait_for(lambda: mock.finished(job), 120, "every task answered", on_timeout=bridge.tail)
    assert_answered_once(mock, job)
    assert mock.redeliveries() == 0
