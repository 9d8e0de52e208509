"""The pipelines a job can run, as the command line finds them: named ones (`trapq pipelines
add`), and the one the TRAPQ_* model settings describe, recorded as `default` on first use.

Building a spec hashes the weight files (downloading a URL or S3 object once) and reads the
label files, and builds no model; it needs the model registry and so torch. Only `pipelines
add` and the first enqueue of new model settings pay that: every other enqueue finds its
pipeline in the job store, by name or by the settings' key, and imports no torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db.pipelines import (
    DEFAULT,
    PipelineError,
    StoredPipeline,
    add_pipeline,
    find_pipeline,
    settings_pipeline,
)
from inference.pipeline_spec import ModelSource, PipelineSpec
from inference.taxonomy import (
    AnswerPolicy,
    TaxonomyError,
    check_threshold,
    kept_labels,
    load_taxonomy,
)
from tasks.errors import UserError
from tasks.settings import Settings
from tasks.store import database_errors, ready_session_factory


def model_sources(s: Settings) -> tuple[ModelSource, ModelSource, ModelSource | None]:
    """Detector, classifier and optional filter; raises inference.weights.WeightsError."""
    from inference.registry import Role, model_source

    def source(
        name: str, role: Role, weights: str, labels: str, sha256: str, side: int = 0
    ) -> ModelSource:
        return model_source(
            name,
            role,
            weights=weights,
            labels=labels,
            sha256=sha256,
            random_weights=s.random_weights,
            cache_dir=s.weights_cache_dir,
            input_size=(side, side) if side else None,
        )

    return (
        source(s.detector, "detector", s.detector_weights, s.detector_labels, s.detector_sha256),
        source(
            s.classifier,
            "classifier",
            s.classifier_weights,
            s.classifier_labels,
            s.classifier_sha256,
            s.classifier_input_size,
        ),
        source(
            s.filter_classifier,
            "classifier",
            s.filter_weights,
            s.filter_labels,
            s.filter_sha256,
            s.filter_input_size,
        )
        if s.filter_classifier
        else None,
    )


def pipeline_spec(s: Settings) -> PipelineSpec:
    """The spec a worker started with these settings loads: what the producer stores."""
    from inference.weights import WeightsError

    try:
        detector, classifier, flt = model_sources(s)
    except WeightsError as e:
        raise UserError(
            f"{e} (enqueue hashes the weights the workers will load, to name the job's pipeline)"
        ) from None
    return PipelineSpec(detector, classifier, flt, s.box_threshold, s.top_k, s.filter_negative,
                        settings_answers(s, classifier.labels))


def settings_answers(s: Settings, labels: tuple[str, ...]) -> AnswerPolicy | None:
    """TRAPQ_CLASSIFIER_TAXONOMY with TRAPQ_SPECIES_THRESHOLD, checked against the labels;
    None without a taxonomy (the species threshold then has nothing to roll up to)."""
    if not s.classifier_taxonomy:
        return None
    try:
        taxonomy = load_taxonomy(Path(s.classifier_taxonomy), labels)
    except TaxonomyError as e:
        raise UserError(f"TRAPQ_CLASSIFIER_TAXONOMY: {e}") from None
    try:
        threshold = check_threshold(s.species_threshold)
    except TaxonomyError as e:
        raise UserError(f"TRAPQ_SPECIES_THRESHOLD: {e}") from None
    return AnswerPolicy(taxonomy, None, threshold)


def with_taxa(
    spec: PipelineSpec, entries: list[str] | None, threshold: float | None
) -> PipelineSpec:
    """The job's pipeline under its deployment's taxa list and its project's species
    threshold: another list or threshold is another fingerprint. Refused in one line before
    any job exists: a list naming no label of the classifier, a threshold outside (0, 1]."""
    base = spec.answers
    taxonomy = base.taxonomy if base else None
    try:
        taxa = kept_labels(entries, spec.classifier.labels, taxonomy) if entries else None
        if threshold is not None:
            check_threshold(threshold)
    except TaxonomyError as e:
        raise UserError(str(e)) from None
    if taxa is None and taxonomy is None:
        return spec  # nothing to mask and nothing to roll up to: the pipeline as it is
    chosen = threshold if threshold is not None else (base.threshold if base else None)
    policy = AnswerPolicy(taxonomy, taxa) if chosen is None else AnswerPolicy(
        taxonomy, taxa, chosen)
    return spec.with_answers(policy)


def settings_key(s: Settings) -> str:
    """A hash of the model settings as written: equal keys describe the same pipeline, so an
    enqueue finds `default` without hashing the weights again."""
    written = {
        "detector": [s.detector, s.detector_weights, s.detector_labels, s.detector_sha256],
        "classifier": [s.classifier, s.classifier_weights, s.classifier_labels,
                       s.classifier_sha256, s.classifier_input_size],
        "filter": [s.filter_classifier, s.filter_weights, s.filter_labels, s.filter_sha256,
                   s.filter_input_size, s.filter_negative],
        "box_threshold": s.box_threshold,
        "top_k": s.top_k,
        "random_weights": s.random_weights,
        "answers": [s.classifier_taxonomy, s.species_threshold],
    }
    canonical = json.dumps(written, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def resolve_pipeline(
    s: Settings, factory: sessionmaker[Session], ref: str | None
) -> StoredPipeline:
    """The pipeline a job is enqueued with: NAME or NAME@VERSION, or (None) the settings'
    `default`. A name that is not recorded is a UserError naming the known ones."""
    with database_errors(s), factory.begin() as session:
        try:
            found = find_pipeline(session, ref) if ref else settings_pipeline(
                session, settings_key(s)
            )
        except PipelineError as e:
            raise UserError(str(e)) from None
    if found is not None:
        return found
    spec = pipeline_spec(s)
    with database_errors(s), factory.begin() as session:
        stored, _ = add_pipeline(
            session, DEFAULT, spec.to_dict(), spec.fingerprint(),
            description="the TRAPQ_* model settings", settings_key=settings_key(s),
        )
    return stored


def add_named_pipeline(
    s: Settings, name: str, overrides: dict[str, Any], description: str
) -> tuple[StoredPipeline, bool]:
    """`trapq pipelines add`: the settings with `overrides`, hashed and recorded under name."""
    factory = ready_session_factory(s)
    spec = pipeline_spec(s.model_copy(update=overrides))
    try:
        with database_errors(s), factory.begin() as session:
            return add_pipeline(
                session, name, spec.to_dict(), spec.fingerprint(), description=description
            )
    except PipelineError as e:
        raise UserError(str(e)) from None
