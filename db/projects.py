"""Projects: who shares the GPU pool, with what weight and how many chunks out at most.

A deployment belongs to one project; a deployment without one is in `default` (weight 1),
and a job keeps the project its deployment had when it was enqueued (jobs.project_id), so
moving a deployment later changes only its future jobs. `interactive` holds the fast lane's
scratch deployment (tasks.fast_lane). Both are created on first use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Deployment, Job, Project
from db.states import ChunkState

DEFAULT_PROJECT = "default"
INTERACTIVE_PROJECT = "interactive"
IN_FLIGHT = (ChunkState.QUEUED.value, ChunkState.RUNNING.value)


class ProjectProblem(ValueError):
    """What is wrong with a project request, as one line for the user."""


@dataclass(frozen=True)
class ProjectRow:
    name: str
    weight: float
    max_in_flight: int | None
    created_at: datetime
    n_deployments: int
    n_jobs: int


def check_weight(weight: float) -> None:
    if not math.isfinite(weight) or weight <= 0:
        raise ProjectProblem(f"weight {weight}: give a number above 0 (e.g. 1 or 2.5)")


def check_max_in_flight(max_in_flight: int | None) -> None:
    if max_in_flight is not None and max_in_flight < 1:
        raise ProjectProblem(f"max in flight {max_in_flight}: give at least 1, or leave it out")


def get_or_create_project(s: Session, name: str) -> int:
    """The id of project `name`, created with weight 1 and no cap if new (default and
    interactive come into being this way)."""
    found = s.scalar(select(Project.id).where(Project.name == name))
    if found is not None:
        return found
    with s.begin_nested():
        project = Project(name=name, weight=1.0)
        s.add(project)
    return project.id


def add_project(s: Session, name: str, weight: float, max_in_flight: int | None) -> bool:
    """Create the project, or change its weight and cap; True if it was created."""
    check_weight(weight)
    check_max_in_flight(max_in_flight)
    if not name.strip():
        raise ProjectProblem("a project needs a name")
    project = s.scalar(select(Project).where(Project.name == name).with_for_update())
    if project is None:
        s.add(Project(name=name, weight=weight, max_in_flight=max_in_flight))
        return True
    project.weight = weight
    project.max_in_flight = max_in_flight
    return False


def remove_project(s: Session, name: str) -> None:
    """Remove a project that has no jobs; its deployments go back to `default`."""
    project = s.scalar(select(Project).where(Project.name == name).with_for_update())
    if project is None:
        raise ProjectProblem(f"unknown project {name!r}; `trapq projects` lists them")
    n_jobs = s.scalar(select(func.count()).select_from(Job).where(Job.project_id == project.id))
    if n_jobs:
        raise ProjectProblem(
            f"project {name!r} has {n_jobs} job(s); it can only be removed without any "
            "(`trapq delete` removes jobs)"
        )
    s.delete(project)


def set_deployment_project(s: Session, deployment: str, project: str) -> None:
    dep = s.scalar(select(Deployment).where(Deployment.name == deployment))
    if dep is None:
        raise ProjectProblem(f"unknown deployment {deployment!r}; `trapq deployments` lists them")
    project_id = s.scalar(select(Project.id).where(Project.name == project))
    if project_id is None:
        if project != DEFAULT_PROJECT:
            raise ProjectProblem(
                f"unknown project {project!r}; `trapq projects add {project} --weight 1` "
                "creates it"
            )
        project_id = get_or_create_project(s, DEFAULT_PROJECT)
    dep.project_id = project_id


def project_of_deployment(s: Session, deployment_id: int) -> int:
    """The project a new job of this deployment belongs to."""
    project_id = s.scalar(select(Deployment.project_id).where(Deployment.id == deployment_id))
    return project_id if project_id is not None else get_or_create_project(s, DEFAULT_PROJECT)


def list_projects(s: Session) -> list[ProjectRow]:
    deps = (
        select(Deployment.project_id, func.count().label("n"))
        .group_by(Deployment.project_id)
        .subquery()
    )
    jobs = select(Job.project_id, func.count().label("n")).group_by(Job.project_id).subquery()
    rows = s.execute(
        select(Project, func.coalesce(deps.c.n, 0), func.coalesce(jobs.c.n, 0))
        .outerjoin(deps, deps.c.project_id == Project.id)
        .outerjoin(jobs, jobs.c.project_id == Project.id)
        .order_by(Project.name)
    )
    unassigned = s.scalar(
        select(func.count()).select_from(Deployment).where(Deployment.project_id.is_(None))
    ) or 0
    return [
        ProjectRow(
            p.name, p.weight, p.max_in_flight, p.created_at,
            n_deps + (unassigned if p.name == DEFAULT_PROJECT else 0), n_jobs,
        )
        for p, n_deps, n_jobs in rows
    ]
