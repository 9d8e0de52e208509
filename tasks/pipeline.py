"""The pipeline the TRAPQ_* model settings name, as ModelSources: one function for the producer
(which stores the job's PipelineSpec) and the worker (which loads it), so both read the same
files the same way.

Building the sources hashes the weight files and reads the label files, and builds no model:
the producer pays a file read (and torch's import), never a model load.
"""

from __future__ import annotations

from inference.pipeline_spec import ModelSource, PipelineSpec
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
    return PipelineSpec(detector, classifier, flt, s.box_threshold, s.top_k, s.filter_negative)
