"""What a job's results depend on, as data: the models (by the bytes of their weights) and the
settings that change what is written. Two pipelines with the same fingerprint write the same
results for the same captures; any other pair must never share a job.

Kept free of torch, so the producer, the job store and the CLI can read and compare specs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.taxonomy import AnswerPolicy


@dataclass(frozen=True)
class ModelSource:
    """One model as loaded.

    `sha256` is the hash of the weight file's bytes, computed where the bytes are read (never
    copied from a setting); None means no weight file: a seeded random build (tests,
    benchmarks) or a model without weights. `weights` is where the bytes come from (a local
    path, an http(s) URL or an s3:// URI; inference.weight_store fetches them by sha256); it
    is shown, not compared, since the same bytes lie at different places. `labels` are the
    label names as read, so another label file is another model.
    """

    name: str  # registry name
    weights: str
    labels: tuple[str, ...]
    input_size: tuple[int, int]
    sha256: str | None

    def identity(self) -> dict[str, Any]:
        """The fields that decide results (everything but where the file lay)."""
        return {
            "name": self.name,
            "sha256": self.sha256,
            "labels": list(self.labels),
            "input_size": list(self.input_size),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.identity(), "weights": self.weights}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSource:
        height, width = data["input_size"]
        return cls(
            name=str(data["name"]),
            weights=str(data.get("weights", "")),
            labels=tuple(str(label) for label in data["labels"]),
            input_size=(int(height), int(width)),
            sha256=data["sha256"],
        )


@dataclass(frozen=True)
class PipelineSpec:
    """A job's whole pipeline: stored with the job, rebuilt by each worker from what it loaded."""

    detector: ModelSource
    classifier: ModelSource
    filter: ModelSource | None
    box_threshold: float
    top_k: int
    filter_negative_label: str
    answers: AnswerPolicy | None = None  # taxa list, taxonomy, species threshold

    def fingerprint(self) -> str:
        """Hex sha256 of the canonical JSON of everything that decides results.

        The filter's negative label only counts with a filter, and weight locations never do.
        A pipeline without a taxa list or taxonomy keeps the fingerprint it had before them.
        """
        identity = {
            "detector": self.detector.identity(),
            "classifier": self.classifier.identity(),
            "filter": self.filter.identity() if self.filter else None,
            "box_threshold": float(self.box_threshold),
            "top_k": int(self.top_k),
            "filter_negative_label": self.filter_negative_label if self.filter else None,
        }
        if self.answers is not None:
            identity["answers"] = self.answers.identity()
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "detector": self.detector.to_dict(),
            "classifier": self.classifier.to_dict(),
            "filter": self.filter.to_dict() if self.filter else None,
            "box_threshold": float(self.box_threshold),
            "top_k": int(self.top_k),
            "filter_negative_label": self.filter_negative_label,
            **({"answers": self.answers.to_dict()} if self.answers else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineSpec:
        flt = data.get("filter")
        return cls(
            detector=ModelSource.from_dict(data["detector"]),
            classifier=ModelSource.from_dict(data["classifier"]),
            filter=ModelSource.from_dict(flt) if flt else None,
            box_threshold=float(data["box_threshold"]),
            top_k=int(data["top_k"]),
            filter_negative_label=str(data["filter_negative_label"]),
            answers=AnswerPolicy.from_dict(data["answers"]) if data.get("answers") else None,
        )

    def with_answers(self, answers: AnswerPolicy | None) -> PipelineSpec:
        """The same models under another taxa list, taxonomy or threshold."""
        return dataclasses.replace(self, answers=answers)

    def differences(self, other: PipelineSpec) -> list[str]:
        """What differs, e.g. ["detector sha256", "box_threshold"]: for a one-line error."""
        mine, theirs = self.to_dict(), other.to_dict()
        found = []
        for role in ("detector", "classifier", "filter"):
            a, b = mine[role] or {}, theirs[role] or {}
            found += [
                f"{role} {k}"
                for k in ("name", "sha256", "labels", "input_size")
                if a.get(k) != b.get(k)
            ]
        found += [k for k in ("box_threshold", "top_k") if mine[k] != theirs[k]]
        negative = self.filter_negative_label != other.filter_negative_label
        if negative and (self.filter or other.filter):
            found.append("filter_negative_label")
        if mine.get("answers") != theirs.get("answers"):
            found.append("taxa list, taxonomy or species threshold")
        return found


def sha256_of(path: Path) -> str:
    """The hash a ModelSource records: of the file's bytes, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
