"""The worker package's layout holds: every module that hooks a Celery signal is imported by
the worker (a guard missing from `include` silently never runs), and `trapq worker`'s
supervisor starts without Celery's worker machinery or torch (it only reads exit codes)."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import tasks.worker
from tasks.celery_app import celery_config
from tasks.settings import Settings
from tasks.worker import CELERY_INCLUDE

WORKER_DIR = Path(tasks.worker.__file__).parent


def connects_celery_signal(path: Path) -> bool:
    """`signals.<name>.connect` anywhere in the module, as a decorator or a call."""
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "connect"
            and isinstance(node.value, ast.Attribute)
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "signals"
        ):
            return True
    return False


def test_every_worker_module_that_connects_a_celery_signal_is_in_celerys_include() -> None:
    hooked = {
        f"tasks.worker.{m.name}"
        for m in pkgutil.iter_modules([str(WORKER_DIR)])
        if connects_celery_signal(WORKER_DIR / f"{m.name}.py")
    }
    assert hooked, "the scan found no signal handlers at all: it is broken"
    missing = hooked - set(CELERY_INCLUDE)
    assert not missing, f"connect Celery signals but are missing from CELERY_INCLUDE: {missing}"
    assert celery_config(Settings())["include"] == list(CELERY_INCLUDE)


def test_the_scan_recognises_a_decorated_signal_handler(tmp_path: Path) -> None:
    guard = tmp_path / "new_guard.py"
    guard.write_text(
        "from celery import signals\n\n@signals.worker_ready.connect\ndef _ready(**_):\n    pass\n"
    )
    plain = tmp_path / "plain.py"
    plain.write_text("def connect():\n    pass\n")
    assert connects_celery_signal(guard)
    assert not connects_celery_signal(plain)


@pytest.mark.subprocess  # a fresh interpreter, to see what importing the supervisor pulls in
def test_the_supervisor_imports_no_celery_worker_machinery_and_no_torch() -> None:
    probe = (
        "import json, sys; import tasks.worker.supervisor; "
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    loaded = set(json.loads(out))
    assert "tasks.worker.supervisor" in loaded and "tasks.worker.exits" in loaded
    heavy = {
        m
        for m in loaded
        if m == "torch"
        or m.startswith(("celery.worker", "celery.concurrency", "celery.apps", "kombu.transport"))
        or m in ("tasks.worker.boot", "tasks.chunk", "tasks.celery_app")
    }
    assert not heavy, f"the supervisor pulled in {sorted(heavy)}"
