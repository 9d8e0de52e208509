"""What the field formats share: options, the job's models, paths, boxes, times, label ids."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from db.boxes import ClassificationRecord, DetectionRecord
from db.pipelines import StoredPipeline
from inference.taxonomy import Taxon, Taxonomy


@dataclass(frozen=True)
class ExportOptions:
    """Options of `trapq export`; each format reads the ones it needs."""

    root: str | None = None  # files are written relative to this folder or URI prefix
    title: str | None = None
    project_title: str | None = None
    sampling_design: str | None = None
    contributors: tuple[str, ...] = ()
    public_media: bool = False
    min_probability: float = 0.5  # below it a classification is `unknown` in Camtrap DP


@dataclass(frozen=True)
class JobModels:
    """The models of a job's pipeline (db.pipelines) as exports name them. A model without
    labels (random weights) gives its categories ids in the order first seen."""

    detector: str
    detector_labels: tuple[str, ...]
    classifier: str
    classifier_labels: tuple[str, ...]
    filter: str | None
    box_threshold: float

    pipeline: str  # NAME@VERSION, or "" for a job whose pipeline has no name
    fingerprint: str
    taxonomy: Taxonomy | None = None  # the job's, where its answers were rolled up

    @classmethod
    def of(cls, pipeline: StoredPipeline) -> JobModels:
        detector, classifier, flt = pipeline.detector, pipeline.classifier, pipeline.filter
        return cls(
            detector=detector.name,
            detector_labels=detector.labels,
            classifier=classifier.name,
            classifier_labels=classifier.labels,
            filter=flt.name if flt else None,
            box_threshold=pipeline.box_threshold,
            pipeline=pipeline.label,
            fingerprint=pipeline.fingerprint,
            taxonomy=Taxonomy.from_list(pipeline.taxonomy) if pipeline.taxonomy else None,
        )

    def taxon(self, label: str) -> Taxon | None:
        """The taxonomy's row of an answer (a label, or the taxon it rolled up to)."""
        return self.taxonomy.by_name().get(label) if self.taxonomy else None

    def scientific_name(self, label: str) -> str:
        taxon = self.taxon(label)
        return taxon.scientific_name if taxon else label

    def species(self, detection: DetectionRecord) -> ClassificationRecord | None:
        """The species classifier's result for this box; None if it gave none (e.g. the
        filter sent the crop away)."""
        return detection.classification(self.classifier)

    def names(self) -> str:
        return " + ".join(n for n in (self.detector, self.filter, self.classifier) if n)


class LabelIds:
    """Category ids by label: the model's label order first, then labels as first seen."""

    def __init__(self, labels: tuple[str, ...], first_id: int) -> None:
        self._ids: dict[str, int] = {}
        self._next = first_id
        for label in labels:
            self.id_of(label)

    def id_of(self, label: str) -> int:
        found = self._ids.get(label)
        if found is None:
            found = self._ids[label] = self._next
            self._next += 1
        return found

    def items(self) -> list[tuple[int, str]]:
        return [(i, label) for label, i in self._ids.items()]


def local_path(uri: str) -> Path | None:
    """The file a capture URI names on this machine, or None for a remote URI."""
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return Path(url2pathname(parts.path))
    if len(parts.scheme) <= 1:  # no scheme, or a Windows drive letter
        return Path(uri)
    return None


def file_of(uri: str, root: str | None) -> str:
    """The capture's name relative to root when it lies below it, else its URI as recorded.

    root is a folder (local captures) or a URI prefix such as s3://bucket/night-1/.
    """
    if root is None:
        return uri
    path, root_path = local_path(uri), local_path(root)
    if path is not None and root_path is not None:
        try:
            return Path(os.path.abspath(path)).relative_to(os.path.abspath(root_path)).as_posix()
        except ValueError:
            return uri
    prefix = root.rstrip("/") + "/"
    return uri[len(prefix):] if uri.startswith(prefix) else uri


def normalized_box(
    d: DetectionRecord, width: int | None, height: int | None
) -> tuple[float, float, float, float] | None:
    """[x_min, y_min, width, height] as fractions of the image, top-left origin, inside [0, 1].

    None when the image size is unknown or the box has no area inside the image.
    """
    if not width or not height:
        return None
    x1, x2 = (min(max(v / width, 0.0), 1.0) for v in (d.x1, d.x2))
    y1, y2 = (min(max(v / height, 0.0), 1.0) for v in (d.y1, d.y2))
    if x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2 - x1, y2 - y1


def utc_z(t: datetime) -> str:
    """ISO 8601 in UTC to the second with a Z designator (`2024-06-01T21:15:00Z`)."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def utcnow() -> datetime:
    return datetime.now(UTC)
