"""Test tiers by what a test starts, so `make test-fast` cannot drift from the truth.

A test that starts a Celery worker carries the `worker` marker; one that starts another
process of ours (the installed `trapq`, a Python script, redis-server, a namespace) carries
`subprocess`; one that computes for many seconds in-process (full-size detectors on a CPU)
says `heavy`. All three imply `slow`, the marker `make test-fast` (`pytest -m "not slow"`)
leaves out. The markers come from the fixtures a test uses (PROCESS_FIXTURES, transitive: a fixture
that uses `worker_factory` marks every test using it), so nobody has to remember them; a test
that starts such a process some other way must say so with `@pytest.mark.subprocess`.

The guard: every process start is recorded, and a test without `slow` that started one of
ours fails, naming the command, in `make test` as in `make test-fast`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

MARKERS = {
    "worker": "starts Celery worker processes (set by the worker fixtures)",
    "subprocess": "starts another process: the installed trapq, a script, a server",
    "heavy": "computes for many seconds in-process (full-size models on a CPU)",
    "slow": "worker, subprocess or heavy: left out by `make test-fast`",
    "serial": "timing-sensitive: under pytest-xdist, runs in one group, one such test at a time",
}

# Under `pytest -n N --dist loadgroup` (make test), tests of one xdist_group run in one xdist
# worker, one after another: the `serial` tests, so no two of them load the machine at once
# while they measure a bound; and the `shared_worker` tests, so they share that worker's pool
# (tests/shared_workers.py) instead of each xdist worker starting the same workers again.
XDIST_GROUPS = {"serial": "serial", "shared_worker": "shared-workers"}

# Fixtures that start processes, and the marker each gives the tests that use it.
PROCESS_FIXTURES = {
    "worker_factory": "worker",
    "shared_worker": "worker",
    "installed_trapq": "subprocess",
    "redis_server": "subprocess",
    "moto_server": "subprocess",
}

# Commands counted as "ours": Python and what the venv installed, and the servers tests run.
OUR_COMMANDS = {"redis-server", "ip", "setpriv", "honcho", "celery", "trapq", "uvicorn"}
VENV_BIN = Path(sys.executable).parent

_started: list[str] = []


def _ours(argv: Any) -> str | None:
    """The command line, when `argv` starts one of our processes."""
    args = [str(argv)] if isinstance(argv, str | os.PathLike) else [str(a) for a in argv]
    if not args:
        return None
    exe = Path(args[0].split()[0])
    if exe.name in OUR_COMMANDS or exe.name.startswith("python") or exe.parent == VENV_BIN:
        return " ".join(args)[:200]
    return None


class _RecordingPopen(subprocess.Popen):  # type: ignore[type-arg]
    def __init__(self, args: Any, *rest: Any, **kwargs: Any) -> None:
        line = _ours(args)
        if line:
            _started.append(line)
        super().__init__(args, *rest, **kwargs)


def pytest_configure(config: pytest.Config) -> None:
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")
    subprocess.Popen = _RecordingPopen  # type: ignore[misc]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Before `-m` selects: the markers of the process fixtures, `slow` under them, and
    the xdist groups."""
    xdist = bool(items) and items[0].config.pluginmanager.has_plugin("xdist")
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        for fixture, marker in PROCESS_FIXTURES.items():
            if fixture in names:
                item.add_marker(marker)
        if any(item.get_closest_marker(m) for m in ("worker", "subprocess", "heavy")):
            item.add_marker("slow")
        for reason, group in XDIST_GROUPS.items() if xdist else ():
            if reason in names or item.get_closest_marker(reason):
                item.add_marker(pytest.mark.xdist_group(group))
                break


def _guarded(item: pytest.Item) -> Generator[None, object, object]:
    before = len(_started)
    result = yield
    started = _started[before:]
    if started and item.get_closest_marker("slow") is None:
        pytest.fail(
            f"{item.nodeid} started `{started[0]}` but carries no `worker` or `subprocess` "
            "marker, so `make test-fast` would run it: mark it @pytest.mark.subprocess, or "
            "add the fixture that starts it to tests/tiers.PROCESS_FIXTURES",
            pytrace=False,
        )
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _guarded(item))
