"""The pipeline the TRAPQ_* model settings name, as ModelSources: one function for the producer
(which stores the job's PipelineSpec) and the worker (which loads it), so both read the same
files the same way.

Building the sources hashes the weight files and reads the label files, and builds no model:
the producer pays a file read (and torch's import), never a model load.
"""

from __future__ import annotations

from pathlib import Path

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
    return AnswerPolicy(taxonomy, None, s.species_threshold)


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

