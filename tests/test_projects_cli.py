"""`trapq projects` and `trapq deployments set --project`: weights, caps, and bad input refused
in one line."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, text

from tests.test_enqueue import add_captures
from tests.trapq_cli import one_line_error, trapq
from tests.worker_jobs import make_job


def test_a_project_is_added_listed_changed_and_removed(
    service_env: dict[str, str], clean_pg: Engine
) -> None:
    added = trapq(service_env, "projects", "add", "moths", "--weight", "3",
                  "--max-in-flight", "8")
    changed = trapq(service_env, "projects", "add", "moths", "--weight", "2.5")
    listed = trapq(service_env, "projects")

    assert added.returncode == 0 and "moths: created, weight 3, at most 8" in added.stdout
    assert changed.returncode == 0 and "moths: updated, weight 2.5" in changed.stdout
    assert "moths" in listed.stdout and "2.5" in listed.stdout
    with clean_pg.connect() as conn:
        row = conn.execute(
            text("SELECT weight, max_in_flight FROM projects WHERE name = 'moths'")
        ).one()
    assert tuple(row) == (2.5, None), "add again sets both, the cap left out is no cap"
    assert trapq(service_env, "projects", "remove", "moths").returncode == 0
    with clean_pg.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM projects WHERE name = 'moths'")) == 0


def test_a_deployment_moves_to_a_project_and_its_next_job_runs_there(
    service_env: dict[str, str], clean_pg: Engine
) -> None:
    add_captures(clean_pg, "trap-a", 3)
    assert trapq(service_env, "projects", "add", "moths", "--weight", "2").returncode == 0

    moved = trapq(service_env, "deployments", "set", "trap-a", "--project", "moths")
    job = make_job(clean_pg, ["file:///x.jpg"], chunk_size=2, deployment="trap-a")

    assert moved.returncode == 0, moved.stderr
    with clean_pg.connect() as conn:
        project = conn.scalar(text(
            "SELECT p.name FROM jobs j JOIN projects p ON p.id = j.project_id WHERE j.id = :j"
        ), {"j": job.job_id})
    assert project == "moths"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["projects", "add", "p", "--weight", "0"], "weight 0.0: give a number above 0"),
        (["projects", "add", "p", "--weight", "-2"], "weight -2.0: give a number above 0"),
        (["projects", "add", "p", "--weight", "nan"], "weight nan: give a number above 0"),
        (["projects", "add", "p", "--max-in-flight", "0"], "max in flight 0: give at least 1"),
        (["projects", "remove", "nope"], "unknown project 'nope'"),
        (["deployments", "set", "trap-a", "--project", "nope"], "unknown project 'nope'"),
        (["deployments", "set", "no-such-trap", "--project", "default"],
         "unknown deployment 'no-such-trap'"),
    ],
)
def test_bad_project_input_is_one_line_and_changes_nothing(
    service_env: dict[str, str], clean_pg: Engine, args: list[str], expected: str
) -> None:
    add_captures(clean_pg, "trap-a", 1)

    assert expected in one_line_error(trapq(service_env, *args))
    with clean_pg.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM projects WHERE name <> 'default'")) == 0
        moved = conn.scalar(text("SELECT count(*) FROM deployments WHERE project_id IS NOT NULL"))
    assert moved == 0


def test_a_project_with_jobs_is_not_removed_and_the_count_is_said(
    service_env: dict[str, str], clean_pg: Engine
) -> None:
    trapq(service_env, "projects", "add", "moths")
    add_captures(clean_pg, "trap-a", 2)
    trapq(service_env, "deployments", "set", "trap-a", "--project", "moths")
    for _ in range(2):
        make_job(clean_pg, ["file:///y.jpg"], chunk_size=2, deployment="trap-a")

    line = one_line_error(trapq(service_env, "projects", "remove", "moths"))

    assert "project 'moths' has 2 job(s)" in line
