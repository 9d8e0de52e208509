"""The taxa list in force for a deployment's jobs, and the species threshold of its project.

The list is stored as given (labels, taxon names or GBIF keys): which classifier labels it
keeps depends on the pipeline a job runs, so that is worked out at enqueue, per job.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.imports import get_or_create_deployment
from db.models import Deployment, Project
from db.projects import DEFAULT_PROJECT


@dataclass(frozen=True)
class TaxaInForce:
    entries: list[str] | None  # the deployment's list; None: every label
    threshold: float | None  # its project's species threshold; None: the pipeline's


def set_taxa_list(session: Session, name: str, entries: list[str] | None) -> None:
    """Deployment NAME's list (created if new); None removes it."""
    deployment_id = get_or_create_deployment(session, name)
    session.execute(
        update(Deployment).where(Deployment.id == deployment_id).values(taxa_list=entries)
    )


def set_species_threshold(session: Session, project: str, threshold: float | None) -> None:
    """Project NAME's threshold (it must exist); None: the pipeline's again."""
    session.execute(
        update(Project).where(Project.name == project).values(species_threshold=threshold)
    )


def taxa_in_force(session: Session, deployment_id: int) -> TaxaInForce:
    """The deployment's list and its project's threshold (no project: `default`'s)."""
    default = select(Project.id).where(Project.name == DEFAULT_PROJECT).scalar_subquery()
    row = session.execute(
        select(Deployment.taxa_list, Project.species_threshold)
        .outerjoin(Project, Project.id == func.coalesce(Deployment.project_id, default))
        .where(Deployment.id == deployment_id)
    ).one()
    entries, threshold = row
    return TaxaInForce([str(e) for e in entries] if entries else None, threshold)
