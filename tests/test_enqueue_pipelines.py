"""Enqueue names a recorded pipeline: it imports no torch (the weights were hashed when the
pipeline was added, or when the settings' `default` was first recorded), an unknown name or
version creates no job, and status names the job's pipeline NAME@VERSION."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from db.imports import get_or_create_deployment, insert_captures
from db.models import Job
from db.session import make_sessionmaker
from tasks.pipeline import add_named_pipeline
from tasks.producer import enqueue
from tests.trapq_cli import one_line_error, trapq
from tests.worker_jobs import settings_of, worker_env

pytestmark = pytest.mark.subprocess

ENQUEUE_AND_CHECK = """
import sys
from tasks.producer import enqueue
from tests.worker_jobs import settings_of
import os
result = enqueue(settings_of(dict(os.environ)), "trap", chunk_size=10,
                 pipeline=sys.argv[1] or None)
assert result.job_id is not None and result.n_chunks == 1, result
print(result.pipeline, "torch" in sys.modules)
"""


@pytest.fixture
def env(service_env: dict[str, str], clean_pg: Engine) -> dict[str, str]:
    env = worker_env(service_env)
    with make_sessionmaker(clean_pg).begin() as s:
        dep = get_or_create_deployment(s, "trap")
        insert_captures(s, dep, [{"uri": f"/images/{i}.jpg", "captured_at": None, "width": None,
                                  "height": None} for i in range(10)])
    return env


def job_count(engine: Engine) -> int:
    with make_sessionmaker(engine)() as s:
        return s.scalar(select(func.count()).select_from(Job)) or 0


def test_enqueue_of_a_recorded_pipeline_imports_no_torch(
    env: dict[str, str], clean_pg: Engine
) -> None:
    s = settings_of(env).model_copy(update={"detector": "constant_boxes", "random_weights": True})
    add_named_pipeline(s, "light", {}, "")
    default_env = {**env, "TRAPQ_DETECTOR": "constant_boxes"}
    first = enqueue(settings_of(default_env).model_copy(
        update={"detector": "constant_boxes", "random_weights": True}), "trap")
    assert first.pipeline == "light@1"  # the settings describe light's contents: the same row
    root = str(Path(__file__).resolve().parents[1])
    for ref, env_used in (("light", env), ("", default_env)):
        out = subprocess.run([sys.executable, "-c", ENQUEUE_AND_CHECK, ref], env=env_used,
                             cwd=root, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["light@1", "False"], out.stdout


def test_an_unknown_pipeline_creates_no_job_and_names_the_known_ones(
    env: dict[str, str], clean_pg: Engine
) -> None:
    add_named_pipeline(settings_of(env).model_copy(update={"detector": "constant_boxes"}),
                       "panama", {}, "")
    for ref in ("quebec", "panama@2"):
        line = one_line_error(trapq(env, "enqueue", "trap", "--pipeline", ref))
        assert f"no pipeline {ref}; known: panama@1" in line
    assert job_count(clean_pg) == 0
    job = trapq(env, "enqueue", "trap", "--pipeline", "panama@1")
    assert job.returncode == 0, job.stderr
    status = trapq(env, "status", job.stdout.strip())
    assert "panama@1" in status.stdout, status.stdout


def test_pipelines_are_added_versioned_listed_shown_and_removed_from_the_command_line(
    env: dict[str, str], clean_pg: Engine, tmp_path: Path
) -> None:
    base = ["--detector", "constant_boxes", "--random-weights"]
    first = trapq(env, "pipelines", "add", "uk", *base, "--top-k", "3", "--description", "UK")
    assert first.returncode == 0 and "uk@1 recorded" in first.stdout, first.stderr
    again = trapq(env, "pipelines", "add", "uk", *base, "--top-k", "3")
    assert "uk@1 unchanged" in again.stdout, again.stderr
    second = trapq(env, "pipelines", "add", "uk", *base, "--top-k", "4")
    assert "uk@2 recorded" in second.stdout, second.stderr
    listing = trapq(env, "pipelines").stdout
    assert "uk@1" in listing and "uk@2" in listing and "constant_boxes" in listing, listing
    shown = trapq(env, "pipelines", "show", "uk@1").stdout
    assert '"pipeline": "uk@1"' in shown and '"top_k": 3' in shown
    job = trapq(env, "enqueue", "trap", "--pipeline", "uk")
    assert job.returncode == 0, job.stderr
    assert "pipeline uk@2" in job.stderr
    refused = one_line_error(trapq(env, "pipelines", "remove", "uk"))
    assert f"used by jobs that have not ended ({job.stdout.strip()})" in refused
    removed = trapq(env, "pipelines", "remove", "uk@1")
    assert removed.returncode == 0 and "removed uk@1" in removed.stdout
