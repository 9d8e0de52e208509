"""`trapq classify`: a few images run ahead of a batch backlog, each bad one failing alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.test_dispatch_workers import dispatching, job_over, settings_for
from tests.trapq_cli import trapq
from tests.worker_jobs import BOXES_PER_IMAGE, job_state, worker_env, write_jpegs

pytestmark = pytest.mark.slow


def test_classify_wait_returns_results_while_a_backlog_runs_and_bad_files_fail_alone(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory,
) -> None:
    env = worker_env(service_env, TRAPQ_DISPATCH_WINDOW_MIN="2")
    backlog = job_over(clean_pg, tmp_path, "backlog", 80)
    (image,) = write_jpegs(tmp_path / "ask", 1, 64, 48)
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a picture")
    worker_factory(env, concurrency=2).start()

    with dispatching(settings_for(env)):
        result = trapq(env, "classify", str(image), str(tmp_path / "missing.jpg"),
                       str(not_an_image), "--wait", "--timeout", "240")
        backlog_then = job_state(clean_pg, backlog)

    assert backlog_then == "running", "the answer came while the backlog still ran"
    assert f"{image}: {BOXES_PER_IMAGE} detection(s)" in result.stdout, result.stderr
    assert result.stdout.count("(demo_classifier)") == BOXES_PER_IMAGE
    assert f"{tmp_path / 'missing.jpg'}: no such file" in result.stderr
    assert f"{not_an_image}: not an image" in result.stderr
    assert result.returncode == 1 and "2 of 3 image(s) not classified" in result.stderr
