"""A real Celery worker in a subprocess, for tests: start, wait until ready, stop or SIGKILL.

Each worker runs in its own process group with its log in a file; the `worker_factory`
fixture kills every group it started when the test ends, passed or failed. The fixture is a
plugin of tests/conftest.py: tests name it as a parameter and never import it.

Test workers start without Celery's mingle (a second of asking other workers for their
revoked tasks at start-up) and gossip: no test's worker learns anything from a neighbour
that way; `peers=True` keeps both for a test that needs them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tasks.worker.supervisor import celery_argv

READY_TIMEOUT_S = 120.0


class WorkerProcess:
    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        *,
        pool: str = "threads",
        concurrency: int = 2,
        node: str | None = None,
        argv: list[str] | None = None,
        peers: bool = False,
    ) -> None:
        self.env = env
        self.log_path = log_path
        self.node = node or f"test-{uuid.uuid4().hex[:8]}@%h"
        self.argv = argv or celery_argv(
            env["TRAPQ_QUEUE"], self.node, pool=pool, concurrency=concurrency
        ) + ([] if peers else ["--without-mingle", "--without-gossip"])
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0  # the log's size when the process was launched

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready: str = " ready.") -> WorkerProcess:
        """Start and wait until the log says `ready`, i.e. models loaded and consuming."""
        return self.launch().wait_ready(ready)

    def launch(self) -> WorkerProcess:
        """Start the process, not waiting for it (start_all starts several at once)."""
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self, ready: str = " ready.") -> WorkerProcess:
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if ready in self.log_text()[self._offset:]:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.2)
        self.kill()
        raise TimeoutError(f"worker not ready after {READY_TIMEOUT_S}s:\n{self.tail()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 60.0) -> int | None:
        """Warm shutdown (SIGTERM); SIGKILL if it has not ended within `timeout`."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (prefork children included)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def rss_mb(self) -> float:
        return psutil.Process(self.pid).memory_info().rss / 2**20


def start_all(workers: list[WorkerProcess]) -> list[WorkerProcess]:
    """Start workers side by side (their imports overlap) and wait until all are ready."""
    return [w.wait_ready() for w in [w.launch() for w in workers]]


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Make (not start) workers logging under tmp_path; all are killed at the end."""
    made: list[WorkerProcess] = []

    def make(env: dict[str, str], **kwargs: object) -> WorkerProcess:
        worker = WorkerProcess(env, tmp_path / f"worker-{len(made)}.log", **kwargs)  # type: ignore[arg-type]
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.kill()


def wait_for(
    predicate: Callable[[], object], timeout: float, what: str, every: float = 0.25,
    on_timeout: Callable[[], str] | None = None,
) -> object:
    """Poll until `predicate` returns something truthy; bounded, with a useful failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = on_timeout() if on_timeout else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{detail}")
        time.sleep(every)
