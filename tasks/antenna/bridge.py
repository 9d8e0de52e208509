"""The bridge behind `trapq antenna`: Antenna's tasks in, trapq jobs through the pool, answers
out. Everything it knows is in the job store, so it can be SIGKILLed at any point and
several can run at once.

One round: answers of ended work items are built from SQL and stored (ready); then, if the
pool has room, tasks are taken from every unfinished Antenna job in turn. Meanwhile a thread
of its own claims ready answers and posts them, split under the POST limit. Taken tasks
become captures of a deployment per Antenna project (in a trapq project of the same name,
unless an operator moved it) and one trapq job per batch on the pipeline the Antenna job
asks for, released by the dispatcher, so fair share, Flower, requeue and exactly-once writes
apply; an image this pipeline already processed is answered from SQL without a job.

Room: the pool should answer every task it holds within `answer_within` of Antenna's ack
wait. Its rate is measured over that horizon (captures its chunks ended); the bridge holds at
most rate x horizon tasks, none more while a held task has waited half the horizon, and while
the rate is unknown (an idle pool), only a first batch.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from sqlalchemy.orm import Session, sessionmaker

from db.antenna import (
    Claimed,
    Delivery,
    Load,
    claim_ready,
    ended_tasks,
    image_captures,
    load,
    lock_intake,
    mark_answered,
    processed_items,
    project_deployment,
    record_deliveries,
    release,
    store_answers,
    stuck_chunks,
)
from db.boxes import item_boxes
from db.jobs import create_job
from db.models import AntennaTask
from tasks.antenna.answers import ServedPipeline, answer, positions
from tasks.antenna.client import (
    AntennaAuthError,
    AntennaClient,
    AntennaUnavailable,
    MalformedTask,
)
from tasks.antenna.schemas import PipelineResultsError, TaskResult
from tasks.antenna.settings import AntennaSettings
from tasks.producer import send_chunks
from tasks.settings import Settings

log = logging.getLogger("trapq.antenna")
ROUND_LIMIT = 500  # answers built or claimed per round


class Bridge:
    def __init__(self, settings: Settings, antenna: AntennaSettings, client: AntennaClient,
                 factory: sessionmaker[Session], served: Sequence[ServedPipeline],
                 name: str) -> None:
        self.settings = settings
        self.antenna = antenna
        self.client = client
        self.factory = factory
        self.by_slug = {p.slug: p for p in served}
        self.maps = positions(served)
        self.name = name
        self.host = urlsplit(antenna.url).netloc
        self.ack_wait = timedelta(seconds=antenna.ack_wait_s)
        self.horizon = self.ack_wait * antenna.answer_within
        self._turn = 0
        self._registered = False
        self._posts_failing = threading.Event()

    def register(self) -> None:
        configs = [p.config() for p in self.by_slug.values()]
        for project in self.antenna.projects:
            done = self.client.register(project, self.antenna.service_name, configs)
            log.info("registered %s with Antenna project %s (%d new)",
                     ", ".join(self.by_slug), project, len(done.pipelines_created))

    def run(self, stop: threading.Event) -> None:
        """Rounds until `stop`. Answers are posted by a thread of their own, so a POST that
        Antenna is slow to take (megabytes of positional scores) never keeps the pool from
        its next tasks. Antenna unavailable: each thread backs off, and no more tasks are
        taken while posts fail; a refused token stops both."""
        refused: list[AntennaAuthError] = []

        def post_round() -> bool:
            if not self._registered:
                return False
            try:
                posted = self.post_ready()
            except AntennaUnavailable:
                self._posts_failing.set()
                raise
            except AntennaAuthError as e:
                refused.append(e)
                stop.set()
                return False
            self._posts_failing.clear()
            return posted > 0

        poster = threading.Thread(target=self._loop, args=(stop, post_round),
                                  name="antenna-post", daemon=True)
        poster.start()
        try:
            self._loop(stop, self.step)
        finally:
            stop.set()
            poster.join()
        if refused:
            raise refused[0]

    def _loop(self, stop: threading.Event, one_round: Callable[[], bool]) -> None:
        backoff = 0.0
        while not stop.is_set():
            try:
                busy = one_round()
                backoff = 0.0
            except AntennaUnavailable as e:
                backoff = min(max(2 * backoff, 1.0), self.antenna.backoff_max_s)
                log.warning("Antenna unavailable (%s); trying again in %.0f s", e, backoff)
                stop.wait(backoff)
                continue
            if not busy:
                stop.wait(self.antenna.poll_s)

    def step(self) -> bool:
        """One round of the main thread; True when anything was answered or taken. The first
        registers the pipelines. No tasks are taken while posts fail."""
        if not self._registered:
            self.register()
            self._registered = True
        answered = self.answer_ended()
        self.resend_stuck()
        taken = 0 if self._posts_failing.is_set() else self.take_work()
        return bool(answered or taken)

    def answer_ended(self) -> int:
        now = datetime.now(UTC)
        with self.factory.begin() as session:
            ended = ended_tasks(session, self.host, list(self.by_slug), ROUND_LIMIT)
            boxes = item_boxes(session, [(t.job_id, t.capture_id) for t in ended])
            store_answers(session, {
                t.id: answer(t, boxes[(t.job_id, t.capture_id)], self.by_slug[t.pipeline_slug], now)
                for t in ended
            }, now)
        return len(ended)

    def resend_stuck(self) -> None:
        """Send again the chunks held tasks wait on that no worker has shown life on for half
        the horizon, as `trapq requeue --stuck-after` would: a worker killed on them may have
        left their messages in its pipeline's queue, which nobody consumes until that
        pipeline runs again. A second message is harmless (the newest claims the chunk)."""
        before = datetime.now(UTC) - self.horizon / 2
        with self.factory.begin() as session:
            chunk_ids = stuck_chunks(session, self.host, before)
        if chunk_ids:
            sent = send_chunks(self.settings, self.factory, chunk_ids)
            log.warning("sent again %d of %d chunks without a sign of life", sent.sent,
                        len(chunk_ids))

    def post_ready(self) -> int:
        """Post claimed answers, per Antenna job. Answers that certainly did not arrive go
        back to ready; those that may have arrived are never posted again (Antenna
        redelivers a task it did not get, and the redelivery makes it ready once more)."""
        with self.factory.begin() as session:
            claimed = claim_ready(session, self.host, self.name, datetime.now(UTC), ROUND_LIMIT)
        by_job: dict[int, list[Claimed]] = defaultdict(list)
        for c in claimed:
            by_job[c.antenna_job_id].append(c)
        failure = ""
        refused = ""
        for job_id, items in by_job.items():
            ids = {c.reply_subject: c.id for c in items}
            if failure or refused:
                with self.factory.begin() as session:
                    release(session, list(ids.values()))
                continue
            results = [TaskResult.model_validate({"reply_subject": c.reply_subject,
                                                  "result": c.answer}) for c in items]
            report = self.client.post_results(job_id, results, self.maps)
            with self.factory.begin() as session:
                mark_answered(session, [ids[s] for s in report.posted], datetime.now(UTC))
                release(session, [ids[s] for s in report.not_sent])
            if report.posted:
                log.info("posted %d answers to Antenna job %s", len(report.posted), job_id)
            if report.refused_token:
                refused = report.error
            elif report.error:
                failure = report.error
        if refused:
            raise AntennaAuthError(refused)
        if failure:
            raise AntennaUnavailable(failure)
        return len(claimed)

    def take_work(self) -> int:
        with self.factory() as session:  # no room: Antenna is not even asked for its jobs
            if self.room(load(session, self.host, datetime.now(UTC), self.horizon)) <= 0:
                return 0
        slugs = list(self.by_slug)
        jobs = [(project, job) for project in self.antenna.projects
                for job in self.client.jobs(project, slugs)]
        if not jobs:
            return 0
        self._turn = (self._turn + 1) % len(jobs)
        jobs = jobs[self._turn:] + jobs[:self._turn]  # no job always first
        taken = 0
        for i, (project, job) in enumerate(jobs):
            with self.factory.begin() as session:
                lock_intake(session, self.host)
                room = self.room(load(session, self.host, datetime.now(UTC), self.horizon))
                if room <= 0:
                    break
                share = -(-room // (len(jobs) - i))  # the jobs left share the room
                tasks, bad = self.client.take_tasks(job.id, min(share, self.antenna.max_batch))
                if not tasks and not bad:
                    continue
                served = self.by_slug[job.pipeline_slug or slugs[0]]
                self._record(session, project, job.id, served, tasks, bad)
            taken += len(tasks) + len(bad)
            log.info("took %d tasks of Antenna job %s (%d malformed)", len(tasks) + len(bad),
                     job.id, len(bad))
        return taken

    def room(self, now_load: Load) -> int:
        """How many more tasks the pool can answer within the horizon; none while a task
        held has waited half of it (the pool is slower than measured: other work, a slow
        host)."""
        if now_load.oldest_s > self.horizon.total_seconds() / 2:
            return 0
        room = int(now_load.rate * self.horizon.total_seconds()) - now_load.held
        if now_load.held == 0:
            room = max(room, self.antenna.first_batch)
        return min(room, self.antenna.max_batch)

    def _record(self, session: Session, project: int, job_id: int, served: ServedPipeline,
                tasks: Sequence, bad: Sequence[MalformedTask]) -> None:
        """Record the tasks; their new images go to one trapq job, whose chunks wait
        `pending` for the dispatcher, as `trapq enqueue`'s do."""
        now = datetime.now(UTC)
        deliveries = [Delivery(t.id, t.image_id, t.image_url, t.reply_subject or "")
                      for t in tasks]
        deliveries += [
            Delivery(b.task_id, b.image_id, None, b.reply_subject, answer=(
                PipelineResultsError(error=b.error, image_id=b.image_id)
                .model_dump(mode="json", exclude_none=True)
            ))
            for b in bad
        ]
        recorded = record_deliveries(
            session, antenna=self.host, project_id=project, antenna_job_id=job_id,
            pipeline_slug=served.slug, deliveries=deliveries, now=now, ack_wait=self.ack_wait,
        )
        if not recorded.new:
            return
        deployment = project_deployment(session, f"antenna {self.host} project {project}")
        urls = {d.task_id: d.image_url for d in deliveries}
        captures = image_captures(session, deployment, [
            (t.image_id or "", urls[t.task_id] or "") for t in recorded.new
        ])
        done = processed_items(session, list(captures.values()), served.fingerprint)
        todo: list[AntennaTask] = []
        for t in recorded.new:
            t.capture_id = captures[t.image_id or ""]
            if t.capture_id in done:
                t.job_id = done[t.capture_id]
            else:
                todo.append(t)
        if not todo:
            return
        plan = create_job(
            session, deployment, pipeline=served.spec, fingerprint=served.fingerprint,
            pipeline_id=served.id, chunk_size=self.antenna.chunk_size,
            capture_ids=sorted({t.capture_id for t in todo if t.capture_id is not None}),
        )
        for t in todo:
            t.job_id = plan.job_id
