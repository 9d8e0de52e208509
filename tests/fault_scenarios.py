"""Fault scenarios on real worker processes, shared by tests/test_faults.py and bench/faults.py.

Each scenario runs an undisturbed reference job over a deployment's captures, then a second
job over the same captures while it injects one fault, recovers, and audits the second job:
every work item ended exactly once (done, or failed with a reason), no detection row twice,
and results equal to the reference job's. The captures come from a local HTTP server that
holds each chunk's last image until the scenario releases it (hold_last_images), so the
fault lands mid-chunk for certain, however loaded the machine; the detector is the zero-cost
`constant_boxes`, because the model is not what is under test.

Every wait is bounded; every process a scenario starts is killed (by process group) when it
ends, whichever way it ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import redis
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from tasks.visibility import worst_redelivery_s
from tasks.worker.supervisor import celery_argv
from tests.badinputs import READ_TIMEOUT_S, Case, ImageServer, build_corpus
from tests.local_http import QuietHandler, serving
from tests.netns import NetNs, TcpForwarder
from tests.netns import unavailable as netns_unavailable
from tests.services import free_port
from tests.worker_jobs import (
    BOXES_PER_IMAGE,
    ENDED,
    FAULT_TIMEOUTS,
    VISIBILITY_S,
    MadeJob,
    chunk_rows,
    item_states,
    job_state,
    jpeg_bytes,
    make_job,
    send,
    settings_of,
    worker_env,
    write_jpegs,
)
from tests.worker_process import WorkerProcess, start_all, wait_for

JOB_END_TIMEOUT_S = 180.0
IMAGE_DELAY_S = 0.12

WorkerFactory = Callable[..., WorkerProcess]


class Unavailable(Exception):
    """The scenario cannot run on this machine (e.g. no network namespaces); says why."""


@dataclass
class Lab:
    """What a scenario needs: the job store, a TRAPQ_* environment, a place for files and
    a factory of workers that are all killed when the caller's scope ends."""

    engine: Engine
    env: dict[str, str]
    tmp: Path
    workers: WorkerFactory


@dataclass(frozen=True)
class Audit:
    n: int
    done: int
    failed: int
    lost: int  # work items neither done nor failed
    duplicates: int  # detection rows beyond the first with the same job, capture and box
    failed_without_reason: int
    mismatched: int  # done captures whose results differ from the reference job's

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.failed_without_reason or self.mismatched)


@dataclass
class Outcome:
    name: str
    job_id: int
    audit: Audit
    job_state: str
    trials_ok: int = 0
    trials: int = 0
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.audit.ok and self.job_state == "done" and self.trials_ok == self.trials

    def line(self) -> str:
        a = self.audit
        trials = f" trials={self.trials_ok}/{self.trials}" if self.trials else ""
        return (
            f"{self.name}: job {self.job_id} {self.job_state}{trials} captures={a.n} "
            f"done={a.done} failed={a.failed} lost={a.lost} duplicates={a.duplicates} "
            f"failed_without_reason={a.failed_without_reason} mismatched={a.mismatched}"
            + ("".join(f"\n  {n}" for n in self.notes))
        )


def audit(engine: Engine, job_id: int, reference_job_id: int | None = None) -> Audit:
    with engine.connect() as conn:
        states = dict(conn.execute(text(
            "SELECT state, count(*) FROM job_captures WHERE job_id = :j GROUP BY state"
        ), {"j": job_id}).all())
        no_reason = conn.scalar(text(
            "SELECT count(*) FROM job_captures WHERE job_id = :j AND state = 'failed' "
            "AND coalesce(error, '') = ''"
        ), {"j": job_id})
        duplicates = conn.scalar(text(
            "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM detections "
            "WHERE job_id = :j GROUP BY capture_id, x1, y1, x2, y2, label "
            "HAVING count(*) > 1) d"
        ), {"j": job_id})
    mismatched = 0
    if reference_job_id is not None:
        got, want = results_by_capture(engine, job_id), results_by_capture(engine, reference_job_id)
        with engine.connect() as conn:
            done = conn.scalars(text(
                "SELECT capture_id FROM job_captures WHERE job_id = :j AND state = 'done'"
            ), {"j": job_id}).all()
        mismatched = sum(1 for c in done if got.get(c) != want.get(c))
    n = sum(states.values())
    done_n, failed_n = states.get("done", 0), states.get("failed", 0)
    return Audit(n, done_n, failed_n, n - done_n - failed_n, int(duplicates), int(no_reason),
                 mismatched)


def results_by_capture(engine: Engine, job_id: int) -> dict[int, list[tuple[object, ...]]]:
    """Each capture's detections with their top-1 classification, rounded past float noise
    (two runs batch crops differently, which may move the last bits of a score)."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT d.capture_id, d.x1, d.y1, d.x2, d.y2, d.score, d.label, c.label, c.score "
            "FROM detections d LEFT JOIN classifications c ON c.detection_id = d.id "
            "WHERE d.job_id = :j"
        ), {"j": job_id}).all()
    out: dict[int, list[tuple[object, ...]]] = {}
    for cid, x1, y1, x2, y2, score, label, clabel, cscore in rows:
        out.setdefault(cid, []).append((
            round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2), round(score, 4), label,
            clabel, None if cscore is None else round(cscore, 3),
        ))
    return {cid: sorted(v, key=repr) for cid, v in out.items()}


def fault_env(env: dict[str, str], **overrides: str) -> dict[str, str]:
    return worker_env(env, **FAULT_TIMEOUTS, **{"TRAPQ_FETCH_THREADS": "1", **overrides})


def wait_job_end(engine: Engine, job_id: int, worker: WorkerProcess,
                 timeout: float = JOB_END_TIMEOUT_S) -> str:
    wait_for(lambda: job_state(engine, job_id) in ENDED, timeout, f"job {job_id} to end",
             on_timeout=worker.tail)
    return job_state(engine, job_id)


def _captures(server: ImageServer, n: int) -> list[str]:
    return [f"{server.url}/img/{i}.jpg" for i in range(n)]


def _reference_then_job(
    lab: Lab, env: dict[str, str], server: ImageServer, worker: WorkerProcess,
    n: int, chunk_size: int, deployment: str,
) -> tuple[int, MadeJob]:
    """Run an undisturbed job to its end with `worker`, then plan (not send) the job under test."""
    reference = make_job(lab.engine, _captures(server, n), chunk_size=chunk_size,
                         deployment=deployment)
    send(env, lab.engine, reference.chunk_ids)
    if wait_job_end(lab.engine, reference.job_id, worker) != "done":
        raise AssertionError(f"reference job ended {job_state(lab.engine, reference.job_id)}")
    return reference.job_id, make_job(lab.engine, [], chunk_size=chunk_size,
                                      deployment=deployment)


def hold_last_images(server: ImageServer, chunk_size: int) -> None:
    """Hold the fetch of each chunk's last image (a job's captures are chunked in order)
    until server.release(): a running chunk then has its first write batch (TRAPQ_WRITE_BATCH_SIZE
    4, worker_env) written and its last capture pending, i.e. it is mid_chunk, and stays so."""
    assert chunk_size > 4, "a chunk must outlast one write batch"
    server.hold(lambda i: i % chunk_size == chunk_size - 1)


def mid_chunk(engine: Engine, job_id: int, worker: WorkerProcess) -> bool:
    """True while `worker` runs a chunk of the job of which it has written some captures
    (since this delivery started) and has some left. A killed worker's chunk row still
    says `running`, so the worker's name and the start time are what tell them apart."""
    with engine.connect() as conn:
        return bool(conn.scalar(text(
            "SELECT count(*) FROM chunks c WHERE c.job_id = :j AND c.state = 'running' "
            "AND c.worker LIKE :w AND EXISTS (SELECT 1 FROM job_captures i "
            "WHERE i.chunk_id = c.id AND i.state = 'done' AND i.finished_at >= c.started_at) "
            "AND EXISTS (SELECT 1 FROM job_captures i "
            "WHERE i.chunk_id = c.id AND i.state = 'pending')"
        ), {"j": job_id, "w": worker.node.split("@", 1)[0] + "@%"}))


def wait_mid_chunk(
    lab: Lab, job: MadeJob, worker: WorkerProcess, what: str = "a chunk half done"
) -> None:
    wait_for(lambda: mid_chunk(lab.engine, job.job_id, worker), 60, what, every=0.05,
             on_timeout=worker.tail)


def sigkill_restart(lab: Lab, trials: int = 10, n: int = 60, chunk_size: int = 6) -> Outcome:
    """SIGKILL the worker mid-chunk `trials` times over one job, starting it again each time.

    A restarted worker takes queued chunks at once, and its sweep (every second here) puts
    back on the queue the killed deliveries once they are older than the visibility timeout.
    Each worker is caught on a chunk's held last image (hold_last_images), killed, and only
    then is the image answered (into a closed socket).
    """
    env = fault_env(lab.env, TRAPQ_MAX_DELIVERIES="30")
    ok = 0
    notes: list[str] = []
    with ImageServer() as server:
        worker = lab.workers(env).start()
        ref_id, job = _reference_then_job(lab, env, server, worker, n, chunk_size, "kill")
        hold_last_images(server, chunk_size)
        send(env, lab.engine, job.chunk_ids)
        for trial in range(trials):
            try:
                wait_mid_chunk(lab, job, worker, f"trial {trial}: a chunk half done")
            except AssertionError as e:
                notes.append(str(e).splitlines()[0])
                break
            worker.kill()
            ok += 1
            server.release()
            hold_last_images(server, chunk_size)
            worker = lab.workers(env).start()
        server.release()
        state = wait_job_end(lab.engine, job.job_id, worker)
        worker.stop()
    with lab.engine.connect() as conn:
        deliveries = conn.scalar(text(
            "SELECT sum(deliveries) FROM chunks WHERE job_id = :j"), {"j": job.job_id})
    notes.append(f"{deliveries} deliveries of {len(job.chunk_ids)} chunks")
    return Outcome("sigkill_restart", job.job_id, audit(lab.engine, job.job_id, ref_id), state,
                   ok, trials, notes, {"deliveries": deliveries, "chunks": len(job.chunk_ids)})


TRAPQ = Path(sys.executable).with_name("trapq")
ORPHAN_LIMIT_S = 10.0


def trapq_worker(lab: Lab, env: dict[str, str], *extra: str) -> WorkerProcess:
    """`trapq worker --gpus cpu` (one supervised Celery worker, node cpu@host), not started.
    No dispatcher: the scenarios send their chunks themselves, and one beside them would send
    each again under a new task id."""
    argv = [str(TRAPQ), "worker", "--gpus", "cpu", "--concurrency", "1", "--no-dispatch",
            *extra]
    return lab.workers(env, argv=argv, node="cpu@%h")


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes still running (a zombie waiting for its reaper has ended)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def supervisor_kill(lab: Lab, trials: int = 3, n: int = 48, chunk_size: int = 6) -> Outcome:
    """SIGKILL `trapq worker` (the supervisor alone, not its process group) mid-chunk,
    `trials` times over one job, starting it again each time.

    Its Celery worker must stop within ORPHAN_LIMIT_S (parent-death signal: warm shutdown,
    cold past a grace), its chunk in flight finished or back on the queue; the trial counts
    when no child outlived the limit. Audited like every scenario: nothing lost or doubled.
    """
    env = fault_env(lab.env)
    ok = 0
    orphans = 0
    exit_s: list[float] = []
    finished = redelivered = 0
    notes: list[str] = []
    with ImageServer() as server:
        supervisor = trapq_worker(lab, env).start()
        ref_id, job = _reference_then_job(lab, env, server, supervisor, n, chunk_size, "orphan")
        hold_last_images(server, chunk_size)
        send(env, lab.engine, job.chunk_ids)
        for trial in range(trials):
            try:
                wait_mid_chunk(lab, job, supervisor, f"trial {trial}: a chunk half done")
            except AssertionError as e:
                notes.append(str(e).splitlines()[0])
                break
            in_flight = _running_chunks(lab.engine, job.job_id)
            children = psutil.Process(supervisor.pid).children(recursive=True)
            os.kill(supervisor.pid, signal.SIGKILL)
            server.release()  # the orphaned child may finish its chunk in its warm shutdown
            supervisor.wait(30)
            killed_at = time.monotonic()
            while alive(children) and time.monotonic() - killed_at < ORPHAN_LIMIT_S:
                time.sleep(0.05)
            left = alive(children)
            exit_s.append(time.monotonic() - killed_at)
            orphans += len(left)
            for p in left:
                p.kill()
            with lab.engine.connect() as conn:
                done = conn.scalar(text(
                    "SELECT count(*) FROM chunks WHERE id = ANY(:ids) AND state = 'done'"
                ), {"ids": in_flight})
            finished += done
            redelivered += len(in_flight) - done
            ok += not left
            hold_last_images(server, chunk_size)
            supervisor = trapq_worker(lab, env).start()
        server.release()
        state = wait_job_end(lab.engine, job.job_id, supervisor)
        supervisor.stop()
    notes.append(
        f"children gone {max(exit_s, default=0):.1f}s at most after the supervisor's SIGKILL "
        f"(limit {ORPHAN_LIMIT_S:.0f}s); orphans {orphans}; chunks in flight finished "
        f"{finished}, back on the queue {redelivered}"
    )
    return Outcome("supervisor_kill", job.job_id, audit(lab.engine, job.job_id, ref_id), state,
                   ok, trials, notes, {"orphans": orphans,
                                       "orphan_exit_ms": round(1000 * max(exit_s, default=0))})


class HangingHost:
    """A local HTTP server of small JPEGs whose `/hang.jpg` holds its request until
    `release` is set (a host that accepted the connection and went silent)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.url = ""
        self._serving: AbstractContextManager[str] | None = None

    def __enter__(self) -> HangingHost:
        host, body = self, jpeg_bytes(160, 120)

        class Handler(QuietHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/hang.jpg":
                    host.entered.set()
                    host.release.wait(300)
                self.send_body(200, body, "image/jpeg")

        self._serving = serving(Handler)
        self.url = self._serving.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        assert self._serving is not None
        self._serving.__exit__(None, None, None)


def stall(lab: Lab, n: int = 12) -> Outcome:
    """One capture's fetch hangs (read timeout 5 min) after the others came back: the chunk's
    heartbeat must go on and its 10 s deadline stop the run while the fetch still hangs; then
    the host answers again and the retry finishes the chunk."""
    env = fault_env(lab.env, TRAPQ_HTTP_READ_TIMEOUT_S="300", TRAPQ_FETCH_THREADS="2")
    with HangingHost() as host:
        job = make_job(lab.engine, [f"{host.url}/img{i}.jpg" for i in range(n - 1)]
                       + [f"{host.url}/hang.jpg"], chunk_size=n, deployment="stall")
        worker = lab.workers(env, concurrency=1).start()
        send(env, lab.engine, job.chunk_ids)
        wait_for(host.entered.is_set, 60, "the hanging fetch", on_timeout=worker.tail)
        beats: list[datetime] = []
        row: tuple[object, ...] = ()
        first_start: datetime | None = None
        while not (row and "past its deadline" in str(row[2] or "")):
            with lab.engine.connect() as conn:
                row = tuple(conn.execute(text(
                    "SELECT heartbeat_at, started_at, error FROM chunks WHERE id = :c"
                ), {"c": job.chunk_ids[0]}).one())
            if row[2] is None and (not beats or row[0] != beats[-1]):
                beats.append(row[0])  # type: ignore[arg-type]
                first_start = first_start or row[1]  # type: ignore[assignment]
            if worker.proc is None or worker.proc.poll() is not None:
                raise AssertionError(f"worker died\n{worker.tail()}")
            time.sleep(0.05)
        hung = host.release.is_set() is False
        # When the deadline's retry was seen (to within the 50 ms poll), from the first start.
        assert first_start is not None
        deadline_s = (datetime.now(first_start.tzinfo) - first_start).total_seconds()
        host.release.set()
        state = wait_job_end(lab.engine, job.job_id, worker)
        worker.stop()
    gaps = [(b - a).total_seconds() for a, b in zip(beats, beats[1:], strict=False)]
    beat_gap = max(gaps, default=float("nan"))
    notes = [f"heartbeats during the hang: {len(beats)}, longest gap {beat_gap:.2f}s "
             f"(TRAPQ_HEARTBEAT_S {env['TRAPQ_HEARTBEAT_S']}); deadline hit {deadline_s:.1f}s "
             f"after the start (limit {env['TRAPQ_CHUNK_SOFT_TIME_LIMIT_S']}s), fetch still "
             f"hanging: {hung}"]
    return Outcome("stall", job.job_id, audit(lab.engine, job.job_id), state, int(hung), 1,
                   notes, {"stall_beat_gap_ms": round(1000 * beat_gap),
                           "stall_deadline_ms": round(1000 * deadline_s)})


def redelivery(lab: Lab, n: int = 20) -> Outcome:
    """How long a SIGKILLed worker's chunk takes to reach an idle worker of the same queue on
    Redis, against the bound of tasks.visibility (visibility timeout + sweep period)."""
    env = fault_env(lab.env)
    with ImageServer() as server:
        job = make_job(lab.engine, _captures(server, n), chunk_size=n, deployment="redelivery")
        pair = start_all([lab.workers(env, concurrency=1) for _ in range(2)])
        hold_last_images(server, n)
        send(env, lab.engine, job.chunk_ids)
        busy = wait_for(lambda: [w for w in pair if mid_chunk(lab.engine, job.job_id, w)], 60,
                        "a chunk half done", every=0.05, on_timeout=pair[0].tail)
        first = busy[0]  # type: ignore[index]
        (idle,) = [w for w in pair if w is not first]
        first.kill()
        killed_at = time.monotonic()
        server.release()
        wait_for(lambda: chunk_rows(lab.engine, job.job_id)[0].deliveries >= 2, 180,
                 "the killed chunk delivered again", every=0.1, on_timeout=idle.tail)
        returned_s = time.monotonic() - killed_at
        state = wait_job_end(lab.engine, job.job_id, idle)
        idle.stop()
    bound = worst_redelivery_s(settings_of(env).model_copy(update={
        "visibility_timeout_s": int(env["TRAPQ_VISIBILITY_TIMEOUT_S"]),
        "redelivery_sweep_s": int(env["TRAPQ_REDELIVERY_SWEEP_S"]),
    }))
    notes = [f"killed worker's chunk back on an idle worker after {returned_s:.1f}s "
             f"(visibility timeout {VISIBILITY_S:.0f}s, worst case {bound}s)"]
    return Outcome("redelivery", job.job_id, audit(lab.engine, job.job_id), state,
                   int(returned_s <= bound), 1, notes,
                   {"redelivery_ms": round(1000 * returned_s), "redelivery_bound_ms": 1000 * bound})


def partition(lab: Lab, n: int = 24) -> Outcome:
    """Cut a worker host off the network mid-chunk, for real, and bring it back.

    Worker A runs in its own network namespace (tests/netns.py) and reaches PostgreSQL, a
    private redis-server and the image server only through a veth pair. Mid-chunk this
    side of the link goes down: A's packets vanish and its connections hang. Worker B, here,
    gets the chunk once the visibility timeout has passed (Kombu's sweep) and completes
    it, under a new claim. Then the link comes back, A's hung calls resume, and its late
    writes must be refused (the claim token of db.results) or harmless. Audited against a
    reference run by A before the cut: every capture done once, no duplicate rows.
    """
    reason = netns_unavailable()
    if reason:
        raise Unavailable(reason)
    pg = make_url(lab.env["TRAPQ_DATABASE_URL"])
    with (
        NetNs() as ns,
        redis_server(lab.tmp / "redis-partition") as broker,
        ImageServer() as server,
        TcpForwarder(ns.host_addr, ("127.0.0.1", broker.port)) as via_redis,
        TcpForwarder(ns.host_addr, (pg.host or "127.0.0.1", pg.port or 5432)) as via_pg,
        TcpForwarder(ns.host_addr, ("127.0.0.1", urlsplit(server.url).port or 80)) as via_images,
    ):
        here = fault_env(lab.env, TRAPQ_BROKER_URL=broker.url, TRAPQ_RESULT_BACKEND=broker.url)
        redis_there = f"redis://{ns.host_addr}:{via_redis.port}/0"
        there = dict(
            here, TRAPQ_BROKER_URL=redis_there, TRAPQ_RESULT_BACKEND=redis_there,
            TRAPQ_DATABASE_URL=pg.set(host=ns.host_addr, port=via_pg.port).render_as_string(
                hide_password=False),
        )
        node = f"partitioned-{os.urandom(3).hex()}@%h"
        argv = ns.argv(celery_argv(here["TRAPQ_QUEUE"], node, pool="threads", concurrency=1))
        cut_off = lab.workers(there, argv=argv, node=node).start()
        uris = [f"http://{ns.host_addr}:{via_images.port}/img/{i}.jpg" for i in range(n)]
        reference = make_job(lab.engine, uris, chunk_size=n, deployment="partition")
        send(here, lab.engine, reference.chunk_ids)
        if wait_job_end(lab.engine, reference.job_id, cut_off) != "done":
            raise AssertionError("the reference job through the veth pair did not end done")
        job = make_job(lab.engine, [], chunk_size=n, deployment="partition")
        hold_last_images(server, n)
        send(here, lab.engine, job.chunk_ids)
        wait_mid_chunk(lab, job, cut_off)
        # Cut while the worker waits for its held last image, every write before it committed:
        # its PostgreSQL connection runs through a forwarder that stays up, so a cut inside a
        # COPY would leave the backend waiting on it, and the chunk's row locks held, for good
        # (a real partition is ended by TCP keepalives; noted as an issue).
        wait_for(lambda: server.wait_held(0)
                 and item_states(lab.engine, job.job_id).get("done", 0) == n - 1, 60,
                 "every capture but the held one written", every=0.05,
                 on_timeout=cut_off.tail)
        ns.partition()
        cut_at = time.monotonic()
        server.release()  # its answer is lost beyond the cut
        other = lab.workers(here, concurrency=1).start()
        state = wait_job_end(lab.engine, job.job_id, other)
        recovery_s = time.monotonic() - cut_at
        ns.heal()
        healed_at = time.monotonic()
        reacted_s: float | None = None
        try:
            wait_for(lambda: any(m in cut_off.log_text() for m in LATE_WRITER_STOPPED), 180,
                     "the partitioned worker to meet its lost claim", on_timeout=cut_off.tail)
            reacted_s = time.monotonic() - healed_at
        except AssertionError as e:
            late = str(e).splitlines()[0]
        refused = cut_off.log_text().count("its writes are refused")
        other.stop()
        cut_off.stop()
    with lab.engine.connect() as conn:
        claims = conn.scalar(text("SELECT claim FROM chunks WHERE id = :c"),
                             {"c": job.chunk_ids[0]})
    if reacted_s is not None:
        late = f"the cut-off worker met its lost claim {reacted_s:.1f}s later"
    notes = [f"link cut mid-chunk; chunk done by the other worker {recovery_s:.1f}s later "
             f"(visibility timeout {VISIBILITY_S:.0f}s); link back: {late}, {refused} late "
             f"write(s) refused; claims of the chunk: {claims}"]
    return Outcome("partition", job.job_id, audit(lab.engine, job.job_id, reference.job_id),
                   state, int(reacted_s is not None), 1, notes,
                   {"partition_recovery_ms": round(1000 * recovery_s),
                    "partition_late_writes_refused": refused})


# What the cut-off worker logs when the link is back (tasks.chunk): its claim superseded
# (late writes refused), or a connection that the partition broke (the retry then finds the
# chunk done and writes nothing: harmless).
LATE_WRITER_STOPPED = ("this delivery stops", "the chunk is superseded", ": retry 1/")


class RedisServer:
    """A private redis-server on a loopback port (never the machine's shared one).

    `appendonly=True` is what the shipped compose file runs: queued and unacknowledged
    messages are in the append-only file and survive a restart.
    """

    def __init__(self, folder: Path, *, appendonly: bool = True, password: str = "") -> None:
        self.folder = folder
        self.port = free_port()
        self.appendonly = appendonly
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        argv = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
            str(self.folder), "--save", "", "--appendonly", "yes" if self.appendonly else "no",
            "--logfile", str(self.folder / "redis.log"),
        ]
        if self.password:
            argv += ["--requirepass", self.password]
        self.proc = subprocess.Popen(argv, start_new_session=True)
        client = redis.Redis.from_url(self.url)
        try:
            wait_for(lambda: self._pings(client), 20, f"redis-server on port {self.port}")
        finally:
            client.close()
        return self

    @staticmethod
    def _pings(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.exceptions.RedisError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: Redis' own clean shutdown (the AOF is flushed); SIGKILL: a crash."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(20)
        self.proc = None


@contextmanager
def redis_server(folder: Path, **kwargs: object) -> Iterator[RedisServer]:
    server = RedisServer(folder, **kwargs)  # type: ignore[arg-type]
    try:
        yield server.start()
    finally:
        server.stop(signal.SIGKILL)


def redis_restart(
    lab: Lab, n: int = 48, chunk_size: int = 6, down_s: float = 3.0,
    sig: int = signal.SIGTERM,
) -> Outcome:
    """Stop the broker (and result backend) mid-job, keep it down a while, start it again on
    the same port with its append-only file; the worker reconnects and the job completes.
    SIGTERM is Redis' clean shutdown; SIGKILL a crash, where the append-only file (compose's
    set-up) is all that is left of the queue and of the unacknowledged chunks."""
    with redis_server(lab.tmp / "redis-restart") as broker, ImageServer() as server:
        env = fault_env(lab.env, TRAPQ_BROKER_URL=broker.url, TRAPQ_RESULT_BACKEND=broker.url)
        worker = lab.workers(env).start()
        ref_id, job = _reference_then_job(lab, env, server, worker, n, chunk_size, "redis")
        hold_last_images(server, chunk_size)
        send(env, lab.engine, job.chunk_ids)
        wait_mid_chunk(lab, job, worker)
        broker.stop(sig)
        server.release()  # the chunks in flight end while the broker is down
        time.sleep(down_s)  # the outage itself, not a wait for anything
        broker.start()
        state = wait_job_end(lab.engine, job.job_id, worker)
        alive = worker.proc is not None and worker.proc.poll() is None
        worker.stop()
    how = signal.Signals(sig).name
    notes = [f"broker {how}ed and down {down_s:.0f}s mid-chunk; worker alive after: {alive}"]
    name = "redis_restart" if sig == signal.SIGTERM else "redis_killed"
    return Outcome(name, job.job_id, audit(lab.engine, job.job_id, ref_id),
                   state if alive else f"{state} (worker died)", notes=notes)


def redis_data_lost(lab: Lab, n: int = 48, chunk_size: int = 6) -> Outcome:
    """A broker without persistence crashes mid-job and comes back empty: the queued
    messages are gone. The chunks in flight finish; the rest stay `queued` until an
    operator runs `trapq requeue JOB --stuck-after MINUTES`, which sends them again."""
    with redis_server(lab.tmp / "redis-lost", appendonly=False) as broker, \
            ImageServer() as server:
        env = fault_env(lab.env, TRAPQ_BROKER_URL=broker.url, TRAPQ_RESULT_BACKEND=broker.url)
        worker = lab.workers(env).start()
        ref_id, job = _reference_then_job(lab, env, server, worker, n, chunk_size, "lost")
        hold_last_images(server, chunk_size)
        send(env, lab.engine, job.chunk_ids)
        wait_mid_chunk(lab, job, worker)
        broker.stop(signal.SIGKILL)
        server.release()
        broker.start()
        wait_for(lambda: not _running_chunks(lab.engine, job.job_id), 60,
                 "the chunks in flight to end", on_timeout=worker.tail)
        with lab.engine.connect() as conn:
            stranded = conn.scalar(text(
                "SELECT count(*) FROM chunks WHERE job_id = :j AND state = 'queued'"
            ), {"j": job.job_id})
        requeue = subprocess.run(
            [str(Path(sys.executable).with_name("trapq")), "requeue", str(job.job_id),
             "--stuck-after", "0"],
            env=env, capture_output=True, text=True, timeout=120,
        )
        try:
            state = wait_job_end(lab.engine, job.job_id, worker, timeout=60)
        except AssertionError:
            state = job_state(lab.engine, job.job_id)
        worker.stop()
    notes = [f"{stranded} queued chunks lost with the broker's data; "
             f"trapq requeue --stuck-after 0: {(requeue.stdout + requeue.stderr).strip()}"]
    return Outcome("redis_data_lost", job.job_id, audit(lab.engine, job.job_id, ref_id), state,
                   notes=notes)


@contextmanager
def slow_detection_writes(engine: Engine, seconds: float) -> Iterator[None]:
    """Every INSERT or COPY into detections sleeps first (a statement trigger fires for both),
    so a write is in progress long enough to be caught and cut; removed afterwards."""
    with engine.begin() as conn:
        conn.execute(text(
            "CREATE OR REPLACE FUNCTION trapq_fault_slow() RETURNS trigger LANGUAGE plpgsql "
            f"AS $$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$"
        ))
        conn.execute(text(
            "CREATE TRIGGER trapq_fault_slow BEFORE INSERT ON detections "
            "FOR EACH STATEMENT EXECUTE FUNCTION trapq_fault_slow()"
        ))
    try:
        yield
    finally:
        with engine.begin() as conn:
            conn.execute(text("DROP TRIGGER IF EXISTS trapq_fault_slow ON detections"))
            conn.execute(text("DROP FUNCTION IF EXISTS trapq_fault_slow()"))


def terminate_writers(engine: Engine, within_s: float) -> int:
    """pg_terminate_backend on the worker sessions of this database that are writing
    detections right now, by INSERT or COPY (never this connection), and started that
    statement less than `within_s` ago: with slow_detection_writes longer than that, each
    one is cut while its statement still runs, i.e. mid-write. Selected and terminated in
    one statement, so none can finish in between."""
    with engine.connect() as conn:
        terminated = conn.scalars(text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND application_name LIKE 'trapq-worker%' "
            "AND state = 'active' AND query ~* '^\\s*(INSERT INTO|COPY|DELETE FROM) detections' "
            "AND clock_timestamp() - query_start < make_interval(secs => :within)"
        ), {"within": within_s}).all()
        conn.commit()
    return sum(1 for ok in terminated if ok)


def pg_terminate(lab: Lab, kills: int = 6, n: int = 72, chunk_size: int = 6) -> Outcome:
    """Terminate the worker's PostgreSQL backends in the middle of its result writes, `kills`
    times: each write sleeps 0.6 s before its rows go in, and only writes younger than
    0.4 s are cut, so every termination lands mid-write; the job is long enough for all."""
    env = fault_env(lab.env, TRAPQ_MAX_RETRIES="20")
    with ImageServer() as server:
        worker = lab.workers(env).start()
        ref_id, job = _reference_then_job(lab, env, server, worker, n, chunk_size, "pg")
        server.delay_s = IMAGE_DELAY_S  # with the slow writes, a job long enough for `kills`
        terminated = 0
        with slow_detection_writes(lab.engine, 0.6):
            send(env, lab.engine, job.chunk_ids)
            deadline = time.monotonic() + 120
            while terminated < kills and time.monotonic() < deadline:
                if job_state(lab.engine, job.job_id) in ENDED:
                    break
                terminated += terminate_writers(lab.engine, within_s=0.4)
                time.sleep(0.05)
        state = wait_job_end(lab.engine, job.job_id, worker)
        alive = worker.proc is not None and worker.proc.poll() is None
        worker.stop()
    with lab.engine.connect() as conn:
        retries = conn.scalar(text(
            "SELECT coalesce(sum(attempts - 1), 0) FROM chunks WHERE job_id = :j"
        ), {"j": job.job_id})
    notes = [f"{terminated} backends terminated mid-write; {retries} chunk retries; "
             f"worker alive after: {alive}"]
    return Outcome("pg_terminate", job.job_id, audit(lab.engine, job.job_id, ref_id),
                   state if alive else f"{state} (worker died)", terminated, kills, notes)


def _running_chunks(engine: Engine, job_id: int) -> list[int]:
    with engine.connect() as conn:
        return list(conn.scalars(text(
            "SELECT id FROM chunks WHERE job_id = :j AND state = 'running' ORDER BY id"
        ), {"j": job_id}))


def sigterm_warm(lab: Lab, n: int = 48, chunk_size: int = 8) -> Outcome:
    """SIGTERM with two chunks in flight: the worker finishes them and exits; a new worker
    does the rest."""
    env = fault_env(lab.env)
    with ImageServer() as server:
        worker = lab.workers(env, concurrency=2).start()
        ref_id, job = _reference_then_job(lab, env, server, worker, n, chunk_size, "term")
        hold_last_images(server, chunk_size)
        send(env, lab.engine, job.chunk_ids)
        wait_for(lambda: len(_running_chunks(lab.engine, job.job_id)) == 2
                 and mid_chunk(lab.engine, job.job_id, worker), 60, "two chunks in flight",
                 every=0.05, on_timeout=worker.tail)
        in_flight = _running_chunks(lab.engine, job.job_id)
        worker.signal(signal.SIGTERM)
        server.release()
        try:
            code: int | None = worker.wait(60)
        except subprocess.TimeoutExpired:
            code = None
            worker.kill()
        with lab.engine.connect() as conn:
            finished = conn.scalars(text(
                "SELECT id FROM chunks WHERE id = ANY(:ids) AND state = 'done'"
            ), {"ids": in_flight}).all()
        second = lab.workers(env).start()
        state = wait_job_end(lab.engine, job.job_id, second)
        second.stop()
    notes = [f"chunks in flight at SIGTERM: {in_flight}, done when the worker exited: "
             f"{list(finished)}; exit code {code}"]
    return Outcome("sigterm_warm", job.job_id, audit(lab.engine, job.job_id, ref_id), state,
                   len(finished) if code == 0 else 0, len(in_flight), notes)



@dataclass(frozen=True)
class CaseResult:
    case: Case
    state: str
    kind: str | None
    error: str | None
    size: tuple[int | None, int | None]
    detections: int

    @property
    def ok(self) -> bool:
        c = self.case
        if self.state != c.state:
            return False
        if c.state == "done":
            return self.size == c.size and self.detections == BOXES_PER_IMAGE
        reason = self.error or ""
        return self.kind == c.kind and c.phrase in reason and Path(c.uri).name in reason


@dataclass
class BadInputOutcome:
    results: list[CaseResult]
    valid: int
    valid_done: int
    worker_alive: bool
    job_state: str
    audit: Audit

    @property
    def cases_ok(self) -> int:
        return sum(r.ok for r in self.results)

    @property
    def ok(self) -> bool:
        return (self.cases_ok == len(self.results) and self.valid_done == self.valid
                and self.worker_alive and self.job_state == "done" and self.audit.lost == 0
                and self.audit.duplicates == 0 and self.audit.failed_without_reason == 0)

    def lines(self) -> list[str]:
        out = [
            f"{'ok' if r.ok else 'WRONG':5} {r.case.name:48} {r.state:6} {r.kind or '-':15} "
            + (r.error or "{}x{}".format(*r.size))[:100]
            for r in self.results
        ]
        out.append(f"valid captures around them done {self.valid_done}/{self.valid}; "
                   f"worker alive {self.worker_alive}; job {self.job_state}")
        return out


MAX_IMAGE_BYTES = 64 * 1024


def bad_inputs(lab: Lab, chunk_size: int = 6) -> BadInputOutcome:
    """The corpus of tests/badinputs.py through a real worker, each case between two valid
    captures (one local, one over HTTP), so every chunk has valid images around bad ones."""
    env = worker_env(
        lab.env,
        TRAPQ_MAX_IMAGE_MB=str(MAX_IMAGE_BYTES / 2**20),
        TRAPQ_HTTP_READ_TIMEOUT_S=str(READ_TIMEOUT_S),
        TRAPQ_HTTP_CONNECT_TIMEOUT_S="2",
        TRAPQ_HTTP_MAX_REDIRECTS="3",
        TRAPQ_FETCH_THREADS="4",
    )
    with ImageServer(big_bytes=2 * MAX_IMAGE_BYTES) as server:
        cases = build_corpus(lab.tmp / "corpus", server.url, MAX_IMAGE_BYTES)
        local = write_jpegs(lab.tmp / "valid", len(cases))
        valid = [str(p) for p in local] + [f"{server.url}/img/{i}.jpg" for i in range(len(cases))]
        uris: list[str] = []
        for i, case in enumerate(cases):
            uris += [valid[i], case.uri, valid[len(cases) + i]]
        job = make_job(lab.engine, uris, chunk_size=chunk_size, deployment="bad-inputs")
        worker = lab.workers(env).start()
        send(env, lab.engine, job.chunk_ids)
        state = wait_job_end(lab.engine, job.job_id, worker)
        alive = worker.proc is not None and worker.proc.poll() is None
        worker.stop()
    with lab.engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT c.uri, i.state, i.error_kind, i.error, c.width, c.height, "
            "(SELECT count(*) FROM detections d WHERE d.job_id = i.job_id "
            " AND d.capture_id = c.id) FROM job_captures i JOIN captures c ON c.id = i.capture_id "
            "WHERE i.job_id = :j"
        ), {"j": job.job_id}).all()
    by_uri = {r[0]: r[1:] for r in rows}
    results = [
        CaseResult(c, *by_uri[c.uri][:3], tuple(by_uri[c.uri][3:5]), by_uri[c.uri][5])
        for c in cases
    ]
    valid_done = sum(
        1 for u in valid if by_uri[u][0] == "done" and by_uri[u][5] == BOXES_PER_IMAGE
    )
    return BadInputOutcome(results, len(valid), valid_done, alive, state,
                           audit(lab.engine, job.job_id))
