"""A killed pytest leaves nothing behind: what each run owns is named after its pid.

Every process a test run starts inherits OWNER_ENV (this pytest's pid and start time) and
every database and queue it makes carries `p<pid>` in its name (tests.services). At the end
of a session its own processes still running are killed; at the start of one, the processes,
databases and queues of runs that no longer exist are removed. Runs of other developers on
the same machine are alive, so nothing of theirs is touched: a leftover is removed only when
the run that made it is provably gone. Under pytest-xdist each worker is such a run (its own
pid, tag, databases and queues), and its siblings are alive; the controller tags nothing.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable

import psutil
import redis
from sqlalchemy import create_engine, text

OWNER_ENV = "PYTEST_TRAPQ_OWNER"
OWNED_NAME = re.compile(r"^trapq_\w*?_p(\d+)_[0-9a-f]{10}$")  # databases
OWNED_QUEUE = re.compile(r"trapq-[\w-]*?-p(\d+)-[0-9a-f]{10}")  # queues, in Redis key names


def owner_tag(proc: psutil.Process | None = None) -> str:
    proc = proc or psutil.Process()
    return f"{proc.pid}:{proc.create_time():.2f}"


def _alive(tag: str) -> bool:
    """The run of `tag` still runs (same pid, same start time: not a reused pid)."""
    try:
        return owner_tag(psutil.Process(int(tag.partition(":")[0]))) == tag
    except (psutil.NoSuchProcess, ValueError):
        return False


def _pid_alive(pid: int) -> bool:
    return psutil.pid_exists(pid)


def claim_processes() -> None:
    """Tag every process this run starts from now on (environments copy os.environ)."""
    os.environ[OWNER_ENV] = owner_tag()


def _owned(tag_test: Callable[[str], bool]) -> list[psutil.Process]:
    procs = []
    for proc in psutil.process_iter():
        try:
            tag = proc.environ().get(OWNER_ENV)
        except (psutil.Error, OSError):
            continue
        if tag and tag_test(tag):
            procs.append(proc)
    return procs


def _kill(procs: list[psutil.Process]) -> int:
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)
    return len(procs)


def kill_own_processes() -> int:
    """This run's processes still running at its end (a fixture that did not stop its own)."""
    mine = owner_tag()
    me = os.getpid()
    return _kill([p for p in _owned(lambda t: t == mine) if p.pid != me])


def kill_stale_processes() -> int:
    """Processes of earlier runs that were killed before they could stop them."""
    return _kill(_owned(lambda t: not _alive(t)))


def drop_stale_databases(admin_url: str) -> list[str]:
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    dropped = []
    try:
        with engine.connect() as conn:
            names = conn.scalars(text(
                "SELECT datname FROM pg_database WHERE datname LIKE 'trapq%'"
            )).all()
            for name in names:
                match = OWNED_NAME.match(name)
                if match and not _pid_alive(int(match.group(1))):
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                    dropped.append(name)
    finally:
        engine.dispose()
    return dropped


def delete_stale_queues(redis_url: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        stale = []
        for key in client.scan_iter(match="*trapq-*-p*"):
            name = key.decode(errors="replace")
            queue = OWNED_QUEUE.search(name)
            if queue and not _pid_alive(int(queue.group(1))):
                stale.append(key)
        if stale:
            client.delete(*stale)
        return len(stale)
    finally:
        client.close()
