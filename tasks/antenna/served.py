"""Which trapq pipelines the bridge offers Antenna, each as one Antenna pipeline."""

from __future__ import annotations

from collections.abc import Sequence

from tasks.antenna.answers import ServedPipeline
from tasks.errors import UserError
from tasks.pipeline import pipeline_spec
from tasks.settings import Settings


def served_pipelines(settings: Settings, refs: Sequence[str]) -> list[ServedPipeline]:
    """The pipeline the TRAPQ_* model settings describe, named `default`, version 1."""
    unknown = [r for r in refs if r.partition("@")[0] != "default"]
    if unknown:
        raise UserError(f"TRAPQ_ANTENNA_PIPELINES: unknown pipeline {unknown[0]!r}; "
                        "this job store knows only `default` (the TRAPQ_* model settings)")
    spec = pipeline_spec(settings)
    return [ServedPipeline("default", 1, spec.fingerprint(), spec.to_dict())]
