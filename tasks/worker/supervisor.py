"""`trapq worker`: one Celery worker process per GPU, pinned, named, and kept running.

The parent never imports torch or touches CUDA (a CUDA context in a parent breaks what it
starts); it counts GPUs from CUDA_VISIBLE_DEVICES or `nvidia-smi -L`. Each child is a plain
`celery -A tasks worker` with CUDA_VISIBLE_DEVICES set to its GPU and the node name
`gpu<N>@%h` (`cpu@%h` without a GPU). Ctrl-C or SIGTERM is forwarded as SIGTERM, Celery's
warm shutdown: chunks in flight finish, or go back to the queue if a second signal (SIGQUIT,
cold) cuts them short; SIGQUIT first is cold at once. A child that stops itself for the
memory guard is started again at once; one that crashes (a SIGKILL, the kernel's OOM
killer) is started again after a pause, unless it keeps crashing at start; one whose models
cannot load (LOAD_FAILED_EXIT) is not started again, since only the operator can fix that.

Children stay in the supervisor's process group, so a signal to the group reaches them as
the operator meant it: Ctrl-C in a terminal or `kill -TERM -PGID` stops everything warmly
(Celery takes a repeated warm signal as one), `kill -KILL -PGID` kills everything. If the
supervisor alone dies, its children stop too (tasks.worker.orphan_guard): no worker runs on
unsupervised, with no memory guard and perhaps old models.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import FrameType

from tasks.queues import lane_queue
from tasks.settings import Settings
from tasks.worker.exits import (
    DEATH_SIGNAL,
    DEVICE_FAULT_EXIT,
    LOAD_FAILED_EXIT,
    MEMORY_RESTART_EXIT,
    ORPHANED_EXIT,
    SUPERVISOR_PID_ENV,
)

log = logging.getLogger("trapq.supervisor")

FAST_CRASH_S = 60.0  # a child that dies sooner than this after its start crashed at start
MAX_FAST_CRASHES = 5
_PR_SET_PDEATHSIG = 1
# Resolved here, in the supervisor, not in the forked child where only plain calls belong.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent(parent_pid: int) -> None:
    """Run in the child between fork and exec (Popen's preexec_fn), so no logging: the
    child gets DEATH_SIGNAL when its parent dies (tasks.worker.orphan_guard covers the rest)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(DEATH_SIGNAL), 0, 0, 0)
    if os.getppid() != parent_pid:  # died before prctl took effect: nobody would tell us
        os._exit(ORPHANED_EXIT)


@dataclass(frozen=True)
class WorkerSpec:
    node: str  # Celery node name; %h becomes the host name
    gpu: str | None  # CUDA device index as the parent sees it; None: CPU worker


def visible_gpus(environ: Mapping[str, str] = os.environ) -> list[str]:
    """GPU indices this machine offers, without initialising CUDA here."""
    pinned = environ.get("CUDA_VISIBLE_DEVICES")
    if pinned is not None:
        return [g.strip() for g in pinned.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def plan_workers(gpus: str, environ: Mapping[str, str] = os.environ) -> list[WorkerSpec]:
    """`all`: every visible GPU (or one CPU worker if there is none); `cpu`; or `0,1`."""
    choice = gpus.strip().lower()
    if choice == "cpu":
        return [WorkerSpec("cpu@%h", None)]
    if choice == "all":
        found = visible_gpus(environ)
        return [WorkerSpec(f"gpu{g}@%h", g) for g in found] or [WorkerSpec("cpu@%h", None)]
    wanted = [g.strip() for g in choice.split(",") if g.strip()]
    if not wanted or not all(g.isdigit() for g in wanted):
        raise ValueError(f"--gpus {gpus!r}: use all, cpu, or GPU indices like 0,1")
    if environ.get("CUDA_VISIBLE_DEVICES") is None:
        return [WorkerSpec(f"gpu{g}@%h", g) for g in wanted]
    # Indices count within the GPUs this process was given, as CUDA itself counts them.
    visible = visible_gpus(environ)
    if any(int(g) >= len(visible) for g in wanted):
        raise ValueError(
            f"--gpus {gpus!r}: CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']!r} "
            f"leaves {len(visible)} GPU(s), numbered from 0"
        )
    return [WorkerSpec(f"gpu{g}@%h", visible[int(g)]) for g in wanted]


def celery_argv(
    queue: str, node: str, *, pool: str, concurrency: int, loglevel: str = "INFO"
) -> list[str]:
    """The worker command line: the fast lane's queue and the chunk queue, task events on
    for Flower."""
    return [
        sys.executable, "-m", "celery", "-A", "tasks", "worker",
        "--queues", f"{lane_queue(queue)},{queue}",
        "--hostname", node,
        "--pool", pool,
        "--concurrency", str(concurrency),
        "--task-events",
        "--loglevel", loglevel,
    ]


# Frames of 4K captures (26.5 MB each) freed by glibc otherwise stay in its malloc arenas and
# nearly double the decoded-frames term of a worker's RSS (bench/soak.py: 1,786 vs 1,391 MiB).
MALLOC_MMAP_THRESHOLD = str(4 * 2**20)


def child_env(spec: WorkerSpec, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    env = dict(environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", MALLOC_MMAP_THRESHOLD)
    name = spec.node.split("@", 1)[0]
    env["PGAPPNAME"] = f"trapq-worker-{name}"
    env[SUPERVISOR_PID_ENV] = str(os.getpid())
    if spec.gpu is None:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["TRAPQ_DEVICE"] = "cpu"
    else:
        env["CUDA_VISIBLE_DEVICES"] = spec.gpu
        if env.get("TRAPQ_DEVICE", "auto") in ("auto", ""):
            env["TRAPQ_DEVICE"] = "cuda"
    return env


@dataclass
class _Child:
    spec: WorkerSpec
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    fast_crashes: int = 0
    restart_at: float | None = None
    serves_workers: bool = False  # a dispatcher: it has no work of its own once they are gone

    @property
    def active(self) -> bool:
        """Running, or due to be started again."""
        return self.proc is not None or self.restart_at is not None

    def start(self) -> None:
        supervisor = os.getpid()
        self.proc = subprocess.Popen(
            self.argv, env=self.env, preexec_fn=lambda: die_with_parent(supervisor)
        )
        self.started = time.monotonic()
        self.restart_at = None
        log.info("started %s (pid %d, GPU %s)", self.spec.node, self.proc.pid,
                 self.spec.gpu if self.spec.gpu is not None else "none")


@dataclass
class Supervisor:
    children: list[_Child]
    crash_pause_s: float
    stopping: int = 0  # signals received
    exit_code: int = 0
    _poll_s: float = field(default=0.5)

    @classmethod
    def build(
        cls, settings: Settings, specs: list[WorkerSpec], *, pool: str, concurrency: int,
        loglevel: str = "INFO", dispatcher: bool = False,
    ) -> Supervisor:
        """One child per worker spec, and with `dispatcher` one running tasks.dispatcher
        (any number of those may run at once, so every machine may start one)."""
        children = [
            _Child(s, celery_argv(settings.queue, s.node, pool=pool, concurrency=concurrency,
                                  loglevel=loglevel), child_env(s))
            for s in specs
        ]
        if dispatcher:
            spec = WorkerSpec("dispatcher", None)
            children.append(
                _Child(spec, [sys.executable, "-m", "tasks.dispatcher"], child_env(spec),
                       serves_workers=True)
            )
        return cls(children, settings.worker_crash_pause_s)

    def run(self) -> int:
        """Start every child and wait until all have stopped; returns the exit code."""
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)}
        try:
            for child in self.children:
                child.start()
            while any(c.active for c in self.children):
                for child in self.children:
                    self._tend(child)
                if not self.stopping and not self._workers_left():
                    self._stop_helpers()
                time.sleep(self._poll_s)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.exit_code

    def _workers_left(self) -> bool:
        return any(c.active for c in self.children if not c.serves_workers)

    def _stop_helpers(self) -> None:
        """Every worker is gone for good (given up on): the dispatcher beside them stops
        too, so `trapq worker` exits with the workers' code instead of running on."""
        self.stopping = 1
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                log.warning("no worker left: stopping %s", child.spec.node)
                child.proc.send_signal(signal.SIGTERM)

    def _tend(self, child: _Child) -> None:
        now = time.monotonic()
        if child.proc is None:
            if child.restart_at is not None and now >= child.restart_at and not self.stopping:
                child.start()
            elif self.stopping:
                child.restart_at = None
            return
        code = child.proc.poll()
        if code is None:
            return
        child.proc = None
        if self.stopping:
            log.info("%s stopped (exit %d)", child.spec.node, code)
            return
        if code == MEMORY_RESTART_EXIT:
            log.warning("%s stopped itself for the memory guard; starting it again",
                        child.spec.node)
            child.fast_crashes = 0
            child.start()
            return
        if code == LOAD_FAILED_EXIT:
            log.error("%s could not load its models (exit %d, its log says why); not starting "
                      "it again", child.spec.node, code)
            self.exit_code = code
            return
        if code == DEVICE_FAULT_EXIT:
            log.error("%s stopped on a CUDA error that lasts for its process; its chunks were "
                      "sent back", child.spec.node)
        child.fast_crashes = child.fast_crashes + 1 if now - child.started < FAST_CRASH_S else 1
        if child.fast_crashes >= MAX_FAST_CRASHES:
            log.error("%s exited %d, %d times right after start; not starting it again",
                      child.spec.node, code, child.fast_crashes)
            self.exit_code = code or 1
            return
        log.error("%s exited %d; starting it again in %.1fs", child.spec.node, code,
                  self.crash_pause_s)
        child.restart_at = now + self.crash_pause_s

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # First signal: warm shutdown (finish chunks in hand); a second one, or SIGQUIT: cold
        # (they return to the queue, delivered again by the broker).
        self.stopping += 2 if signum == signal.SIGQUIT else 1
        forward = signal.SIGTERM if self.stopping == 1 else signal.SIGQUIT
        log.warning("%s: %s shutdown of %d worker(s)", signal.Signals(signum).name,
                    "warm" if forward == signal.SIGTERM else "cold",
                    sum(not c.serves_workers for c in self.children))
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(forward)
