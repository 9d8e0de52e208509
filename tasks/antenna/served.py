"""Which trapq pipelines the bridge and the push API offer Antenna, each as one Antenna
pipeline: named pipelines from the job store (db.pipelines), `default` being the one the
TRAPQ_* model settings describe, as for `trapq enqueue` without --pipeline."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session, sessionmaker

from db.pipelines import DEFAULT
from tasks.antenna.answers import ServedPipeline
from tasks.pipeline import resolve_pipeline
from tasks.settings import Settings


def served_pipelines(settings: Settings, factory: sessionmaker[Session],
                     refs: Sequence[str]) -> list[ServedPipeline]:
    """NAME (its latest version), NAME@VERSION, or `default`; an unknown one is a UserError
    naming the known ones."""
    served = []
    for ref in refs:
        stored = resolve_pipeline(settings, factory, None if ref == DEFAULT else ref)
        served.append(ServedPipeline(stored.name or ref, stored.version or 1,
                                     stored.fingerprint, stored.spec, stored.id))
    return served
