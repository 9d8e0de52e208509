"""The taxa list in force for a deployment's jobs, and the species threshold of its project.

The list is stored as given (labels, taxon names or GBIF keys): which classifier labels it
keeps depends on the pipeline a job runs, so that is worked out at enqueue, per job.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.imports import get_or_create_deployment
from db.models import Deployment


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


def taxa_in_force(session: Session, deployment_id: int) -> TaxaInForce:
    entries = session.scalar(select(Deployment.taxa_list).where(Deployment.id == deployment_id))
    return TaxaInForce([str(e) for e in entries] if entries else None, None)
