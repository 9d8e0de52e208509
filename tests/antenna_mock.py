"""A mock Antenna (API v2, pull mode) served over real HTTP, for tests and bench.antenna.

Every request is validated with the contract's own models (tasks.antenna.schemas): an
unknown or missing field, a wrong query parameter, an answer to an image the task was not
about, or an algorithm key nobody registered lands in `problems`, which a test asserts empty.
The task queue behaves like Antenna's NATS JetStream consumer: a reserved task not answered
within `ack_wait_s` is handed out again, at most `max_deliveries` times in all; an answer on a
superseded or expired reply subject acknowledges nothing. Every POST is recorded.

Each accepted classification is read as Antenna saves it (`saved`): the taxon by its
`classification` name, the score as max(scores), the rank entry at argmax(scores) in the
algorithm's registered category map (ami/ml/models/pipeline.py
get_or_create_taxon_for_classification) and the top 3 taxa by score index in that map
(ami/main/models.py Classification.top_n). Scores that name another label at their argmax
than `classification`, or `labels` sent beside a registered map, are problems.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from tasks.antenna.schemas import (
    PipelineRegistrationRequest,
    PipelineResultsError,
    PipelineResultsResponse,
    ResultsRequest,
    TasksRequest,
)
from tests.local_http import QuietHandler
from tests.worker_jobs import jpeg_bytes

JOB_QUERY = {"project_id", "pipeline__slug__in", "ids_only", "incomplete_only", "dispatch_mode"}


@dataclass
class MockTask:
    raw: dict[str, Any]  # what is handed out, reply_subject aside (may be malformed on purpose)
    deliveries: int = 0
    subject: str | None = None
    deadline: float = 0.0
    answers: list[Any] = field(default_factory=list)  # accepted (acknowledging), as parsed
    dead: bool = False  # delivered max_deliveries times, never answered
    first_delivered: float | None = None  # time.monotonic()
    answered: float | None = None

    @property
    def acked(self) -> bool:
        return bool(self.answers)


@dataclass
class MockJob:
    id: int
    project_id: int
    pipeline_slug: str
    tasks: list[MockTask]


@dataclass(frozen=True)
class SavedClassification:
    """A classification as Antenna stores and later shows it."""

    image_id: str
    algorithm_key: str
    taxon: str
    score: float
    scores: list[float]
    labels: list[str]  # the registered category map's

    @property
    def top_n(self) -> list[tuple[str, float]]:
        """(label, score) as Classification.top_n(3) shows them: its
        sorted(enumerate(scores), ...)[:3], without sorting 29k scores."""
        ranked = heapq.nlargest(3, range(len(self.scores)), key=self.scores.__getitem__)
        return [(self.labels[i], self.scores[i]) for i in ranked]


@dataclass(frozen=True)
class RecordedPost:
    path: str
    size: int
    body: Any


class AntennaMock:
    def __init__(self, *, token: str = "test-token-0123456789", ack_wait_s: float = 300.0,
                 max_deliveries: int = 2, max_body_bytes: int | None = None) -> None:
        self.token = token
        self.ack_wait_s = ack_wait_s
        self.max_deliveries = max_deliveries
        self.max_body_bytes = max_body_bytes
        self.jobs: dict[int, MockJob] = {}
        self.registered: dict[int, list[PipelineRegistrationRequest]] = {}
        self.posts: list[RecordedPost] = []
        self.saved: list[SavedClassification] = []
        self.problems: list[str] = []
        self.stale_answers: list[str] = []  # answers that acknowledged nothing
        self.unavailable_tasks = 0  # the next N task requests get 503
        self.unavailable_all = False  # every request gets 503 while set
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = self._build_app()

    # -- test helpers -------------------------------------------------------------------

    def add_job(self, project_id: int, slug: str, images: list[tuple[str, str]],
                *, raw_tasks: list[dict[str, Any]] | None = None) -> int:
        """A job over (image_id, url) pairs, plus raw task dicts as given (malformed ones)."""
        with self._lock:
            job_id = next(self._ids)
            tasks = [MockTask({"id": f"{job_id}-{image_id}", "image_id": image_id,
                               "image_url": url}) for image_id, url in images]
            tasks += [MockTask(dict(raw)) for raw in raw_tasks or []]
            self.jobs[job_id] = MockJob(job_id, project_id, slug, tasks)
            return job_id

    def answers(self, job_id: int) -> dict[str, list[dict[str, Any]]]:
        """Accepted answers by task id."""
        with self._lock:
            return {t.raw["id"]: [a.model_dump(mode="json", exclude_unset=True)
                                  for a in t.answers] for t in self.jobs[job_id].tasks}

    def finished(self, job_id: int) -> bool:
        with self._lock:
            self._expire(time.monotonic())
            return all(t.acked or t.dead for t in self.jobs[job_id].tasks)

    def redeliveries(self) -> int:
        with self._lock:
            return sum(max(0, t.deliveries - 1) for j in self.jobs.values() for t in j.tasks)

    def lost(self) -> int:
        with self._lock:
            self._expire(time.monotonic())
            return sum(t.dead for j in self.jobs.values() for t in j.tasks)

    def result_posts(self) -> list[RecordedPost]:
        with self._lock:
            return [p for p in self.posts if p.path.endswith("/result/")]

    def latencies(self) -> list[float]:
        """Seconds from each answered task's first delivery to its accepted answer."""
        with self._lock:
            return [t.answered - t.first_delivered for j in self.jobs.values() for t in j.tasks
                    if t.answered is not None and t.first_delivered is not None]

    def answer_counts(self) -> Counter[int]:
        """How many tasks got 0, 1, 2... accepted answers."""
        with self._lock:
            return Counter(len(t.answers) for j in self.jobs.values() for t in j.tasks)

    # -- serving ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None and self._server.servers, "not started"
        port = self._server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/api/v2"

    def start(self) -> AntennaMock:
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("mock Antenna did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)

    # -- the API ------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def gate(request: Request, call_next: Any) -> Response:
            if request.headers.get("authorization") != f"Token {self.token}":
                return JSONResponse({"detail": "Invalid token."}, status_code=401)
            if self.unavailable_all:
                return JSONResponse({"detail": "unavailable"}, status_code=503)
            return await call_next(request)

        @app.post("/api/v2/projects/{project_id}/pipelines/")
        async def register(project_id: int, request: Request) -> Response:
            raw = await request.body()
            body = self._parse(request, raw, PipelineRegistrationRequest)
            with self._lock:
                self.posts.append(RecordedPost(request.url.path, len(raw), None))
            if body is None:
                return JSONResponse({"detail": "invalid"}, status_code=400)
            with self._lock:
                self.registered.setdefault(project_id, []).append(body)
            return JSONResponse({"pipelines_created": [p.slug for p in body.pipelines],
                                 "pipelines_updated": [], "processing_service_id": 1})

        @app.get("/api/v2/jobs/")
        async def jobs(request: Request) -> Response:
            query = dict(request.query_params)
            if set(query) != JOB_QUERY:
                self._problem(f"GET /jobs/ query {sorted(query)} is not {sorted(JOB_QUERY)}")
            if (query.get("ids_only"), query.get("incomplete_only"),
                    query.get("dispatch_mode")) != ("1", "1", "async_api"):
                self._problem(f"GET /jobs/ filters wrong: {query}")
            slugs = set(query.get("pipeline__slug__in", "").split(","))
            project = int(query.get("project_id", "0"))
            with self._lock:
                self._expire(time.monotonic())
                found = [
                    {"id": j.id, "pipeline_slug": j.pipeline_slug}
                    for j in self.jobs.values()
                    if j.project_id == project and j.pipeline_slug in slugs
                    and not all(t.acked or t.dead for t in j.tasks)
                ]
            return JSONResponse({"count": len(found), "next": None, "previous": None,
                                 "results": found})

        @app.post("/api/v2/jobs/{job_id}/tasks/")
        async def tasks(job_id: int, request: Request) -> Response:
            body = await self._validated(request, TasksRequest)
            if body is None:
                return JSONResponse({"batch_size": ["required"]}, status_code=400)
            with self._lock:
                if self.unavailable_tasks > 0:
                    self.unavailable_tasks -= 1
                    return JSONResponse({"error": "Task queue temporarily unavailable"},
                                        status_code=503)
                job = self.jobs.get(job_id)
                if job is None:
                    return JSONResponse({"detail": "Not found."}, status_code=404)
                return JSONResponse({"tasks": self._reserve(job, body.batch_size)})

        @app.post("/api/v2/jobs/{job_id}/result/")
        async def result(job_id: int, request: Request) -> Response:
            # Parsing megabytes of scores off the event loop, so that task requests go on.
            return await run_in_threadpool(self._result, job_id, request, await request.body())

        return app

    def _result(self, job_id: int, request: Request, raw: bytes) -> Response:
        if self.max_body_bytes is not None and len(raw) > self.max_body_bytes:
            with self._lock:
                self.posts.append(RecordedPost(request.url.path, len(raw), None))
            return JSONResponse({"detail": "Request Entity Too Large"}, status_code=413)
        body = self._parse(request, raw, ResultsRequest)
        job = self.jobs.get(job_id)
        # Read as Antenna saves them before taking the lock, which task requests wait on.
        read = [self._read(job, item.result) for item in body.results] if body and job else []
        with self._lock:
            self.posts.append(RecordedPost(request.url.path, len(raw), body))
            if body is None:
                return JSONResponse({"results": ["invalid"]}, status_code=400)
            if job is None:
                return JSONResponse({"detail": "Not found."}, status_code=404)
            for item, (saved, problems) in zip(body.results, read, strict=True):
                if self._accept(job, item.reply_subject, item.result):
                    self.saved += saved
                    self.problems += problems
        return JSONResponse({"status": "accepted", "job_id": job_id,
                             "results_queued": len(body.results), "tasks": []})

    async def _validated(self, request: Request, model: Any) -> Any:
        return self._parse(request, await request.body(), model)

    def _parse(self, request: Request, raw: bytes, model: Any) -> Any:
        try:
            return model.model_validate_json(raw)
        except ValidationError as e:
            self._problem(f"{request.method} {request.url.path}: {e.errors()[:3]}")
            return None

    def _problem(self, text: str) -> None:
        with self._lock:
            self.problems.append(text)

    def _expire(self, now: float) -> None:
        for job in self.jobs.values():
            for t in job.tasks:
                if t.subject and not t.acked and now > t.deadline:
                    t.subject = None
                    t.dead = t.deliveries >= self.max_deliveries

    def _reserve(self, job: MockJob, n: int) -> list[dict[str, Any]]:
        now = time.monotonic()
        self._expire(now)
        free = [t for t in job.tasks if not t.acked and not t.dead and t.subject is None]
        free.sort(key=lambda t: -t.deliveries)  # redeliveries first, as JetStream does
        handed = []
        for t in free[:n]:
            t.deliveries += 1
            t.first_delivered = t.first_delivered or now
            t.subject = f"$JS.ACK.job{job.id}.{t.raw['id']}.{t.deliveries}"
            t.deadline = now + self.ack_wait_s
            handed.append({**t.raw, "reply_subject": t.subject})
        return handed

    def _accept(self, job: MockJob, subject: str, result: Any) -> bool:
        """Whether the answer acknowledged its task."""
        self._expire(time.monotonic())
        task = next((t for t in job.tasks if t.subject == subject), None)
        if task is None:
            self.stale_answers.append(subject)
            return False
        image_id = str(task.raw.get("image_id"))
        if isinstance(result, PipelineResultsError):
            if result.image_id not in (None, image_id):
                self._problem(f"error answer for image {result.image_id} on task of {image_id}")
        else:
            listed = [s.id for s in result.source_images]
            if listed != [image_id]:
                self._problem(f"task of image {image_id} answered listing {listed}")
            if any(d.source_image_id != image_id for d in result.detections):
                self._problem(f"task of image {image_id} answered with others' detections")
            self._check_keys(job, result)
        task.answers.append(result)
        task.answered = task.answered or time.monotonic()
        task.subject = None
        return True

    def _check_keys(self, job: MockJob, result: Any) -> None:
        known = {
            a.key
            for reg in self.registered.get(job.project_id, [])
            for p in reg.pipelines if p.slug == job.pipeline_slug
            for a in p.algorithms
        }
        used = {d.algorithm.key for d in result.detections} | {
            c.algorithm.key for d in result.detections for c in d.classifications
        }
        if used - known:
            self._problem(f"algorithm keys {sorted(used - known)} were never registered")

    def _read(self, job: MockJob, result: Any) -> tuple[list[SavedClassification], list[str]]:
        if isinstance(result, PipelineResultsError):
            return [], []
        maps = {
            a.key: a.category_map.labels
            for reg in self.registered.get(job.project_id, [])
            for p in reg.pipelines if p.slug == job.pipeline_slug
            for a in p.algorithms if a.category_map is not None
        }
        return read_as_antenna(result, maps)


class Images(QuietHandler):
    """The image host tasks point at: /img/N.jpg a JPEG (seeded by N), /text/N.jpg not an
    image, /redirect?to=URL one redirect to URL, anything else 404."""

    def do_GET(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        name = parts.path.rsplit("/", 1)[-1].removesuffix(".jpg")
        if parts.path.startswith("/img/") and name.isdigit():
            self.send_body(200, jpeg_bytes(seed=int(name)), "image/jpeg")
        elif parts.path.startswith("/text/"):
            self.send_body(200, b"<html>not an image</html>", "text/html")
        elif parts.path == "/redirect":
            self.redirect(parse_qs(parts.query)["to"][0])
        else:
            self.send_body(404, b"no such image")


def read_as_antenna(result: PipelineResultsResponse, maps: dict[str, list[str]]
                    ) -> tuple[list[SavedClassification], list[str]]:
    """The classifications of `result` as Antenna saves them, given each algorithm key's
    registered labels, and what it would read wrong."""
    saved: list[SavedClassification] = []
    problems: list[str] = []
    for d in result.detections:
        for c in d.classifications:
            labels = maps.get(c.algorithm.key)
            if not c.scores:
                problems.append(f"{c.algorithm.key}: no scores (Antenna takes max(scores))")
                continue
            if labels is None:
                continue
            if c.labels is not None:
                problems.append(f"{c.algorithm.key}: labels sent beside its registered map")
            best = c.scores.index(max(c.scores))
            if best >= len(labels) or labels[best] != c.classification:
                problems.append(f"{c.algorithm.key}: scores name position {best}, "
                                f"classification says {c.classification!r}")
                continue
            saved.append(SavedClassification(d.source_image_id, c.algorithm.key,
                                             c.classification, max(c.scores), c.scores, labels))
    return saved, problems
