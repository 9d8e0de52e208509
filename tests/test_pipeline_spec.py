"""A pipeline's fingerprint names what decides results (weights' bytes, labels, input size,
thresholds) and nothing else (where the weights lie), and survives the job store's JSON."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from inference.pipeline_spec import ModelSource, PipelineSpec, sha256_of
from inference.registry import model_source
from inference.weights import WeightsError

DET = ModelSource("demo_detector", "/a/det.pt", ("background", "moth"), (540, 960), "a" * 64)
CLS = ModelSource("demo_classifier", "/a/cls.pt", ("moth", "nonmoth"), (64, 64), "b" * 64)
SPEC = PipelineSpec(DET, CLS, None, 0.5, 5, "nonmoth")


def test_fingerprint_is_stable_across_processes_and_the_job_stores_json() -> None:
    again = PipelineSpec.from_dict(json.loads(json.dumps(SPEC.to_dict())))
    assert again == SPEC and again.fingerprint() == SPEC.fingerprint()
    # Pinned: a change of the canonical form would orphan every stored job's fingerprint.
    assert SPEC.fingerprint() == (
        "b63d6fcbc49a625b027675b49abde0134265a16ad9edbdc3ba91071e5c22543e"
    )


@pytest.mark.parametrize(
    "change",
    [
        {"detector": dataclasses.replace(DET, sha256="c" * 64)},
        {"classifier": dataclasses.replace(CLS, labels=("moth", "other"))},
        {"classifier": dataclasses.replace(CLS, input_size=(96, 96))},
        {"classifier": dataclasses.replace(CLS, sha256=None)},
        {"filter": CLS},
        {"box_threshold": 0.3},
        {"top_k": 3},
    ],
)
def test_anything_that_decides_results_changes_the_fingerprint(change: dict[str, object]) -> None:
    other = dataclasses.replace(SPEC, **change)  # type: ignore[arg-type]
    assert other.fingerprint() != SPEC.fingerprint()
    assert other.differences(SPEC)


def test_weight_locations_and_an_unused_negative_label_do_not() -> None:
    moved = dataclasses.replace(
        SPEC,
        detector=dataclasses.replace(DET, weights="/mnt/elsewhere/det.pt"),
        filter_negative_label="other",
    )
    assert moved.fingerprint() == SPEC.fingerprint() and moved.differences(SPEC) == []
    with_filter = dataclasses.replace(SPEC, filter=CLS)
    assert (
        dataclasses.replace(with_filter, filter_negative_label="other").fingerprint()
        != with_filter.fingerprint()
    )


def test_a_source_hashes_the_bytes_it_finds_and_refuses_a_wrong_pin(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not even a checkpoint: sources never load it")
    source = model_source("demo_classifier", "classifier", weights=str(weights))
    assert source.sha256 == sha256_of(weights) and source.weights == str(weights)
    assert source.labels and source.input_size == (64, 64)
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        model_source("demo_classifier", "classifier", weights=str(weights), sha256="0" * 64)
    assert model_source("demo_classifier", "classifier", random_weights=True).sha256 is None
