"""trapq's pipelines and results in Antenna's words: the pipeline registered for each named
pipeline, and the answer to one task read back from the job store.

An algorithm's key names its model and the bytes of its weights (or, for a seeded random
build, its labels and input size), so results from other weights never share a key, and
Antenna's category map for the key is the classifier's labels, registered once.

Antenna reads `scores` by position in that map (ami/ml/models/pipeline.py
get_or_create_taxon_for_classification: the rank of a new taxon from
`category_map.data[argmax(scores)]`; ami/main/models.py Classification.top_n and
predictions: taxa by score index), the taxon by the `classification` name, and `labels` only
when no map is registered. So an answer is kept compact, its top-k as `labels` and `scores`
(what the job store holds), and is serialized with the POSITIONS context (`positions`) into
what Antenna reads right as it leaves: `scores` at the labels' positions in the map, zero
elsewhere (written `0`: two bytes a label), no `labels` (schemas.ClassificationResponse).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from db.antenna import EndedTask
from db.boxes import ClassificationRecord, DetectionRecord
from db.states import ItemState
from tasks.antenna.schemas import (
    AlgorithmConfig,
    AlgorithmReference,
    BoundingBox,
    CategoryMap,
    ClassificationResponse,
    DetectionResponse,
    PipelineConfig,
    PipelineResultsError,
    PipelineResultsResponse,
    PipelineStage,
    PipelineStageParam,
    SourceImage,
)

ROLES = (("detector", "detection"), ("filter", "classification"),
         ("classifier", "classification"))


@dataclass(frozen=True)
class ServedPipeline:
    """A trapq named pipeline as one Antenna pipeline."""

    name: str
    version: int
    fingerprint: str
    spec: dict[str, Any]  # inference.pipeline_spec.PipelineSpec.to_dict()
    id: int | None = None  # the pipelines row, which the bridge's jobs pin

    @property
    def slug(self) -> str:
        return slug_of(self.name, self.version)

    def classifiers(self) -> dict[str, tuple[AlgorithmReference, bool]]:
        """Classifier name -> its reference and whether its answer is terminal (a filter's
        is not)."""
        return {
            ref.name: (ref, role != "filter")
            for role in ("filter", "classifier")
            if (ref := self.reference(role)) is not None
        }

    def reference(self, role: str) -> AlgorithmReference | None:
        model = self.spec.get(role)
        if not isinstance(model, dict):
            return None
        return AlgorithmReference(name=str(model["name"]), key=algorithm_key(model))

    def config(self) -> PipelineConfig:
        algorithms = [
            AlgorithmConfig(
                name=str(model["name"]), key=algorithm_key(model), task_type=task_type,
                version_name=(model.get("sha256") or "random")[:12],
                category_map=CategoryMap(
                    labels=list(model["labels"]),
                    data=[{"label": lbl, "index": i} for i, lbl in enumerate(model["labels"])],
                ) if model["labels"] else None,  # a random build (tests) has no labels
            )
            for role, task_type in ROLES
            if isinstance(model := self.spec.get(role), dict)
        ]
        stages = [PipelineStage(key="detect", name="Detect", params=[
            PipelineStageParam(name="Box threshold", key="box_threshold")
        ])]
        if self.spec.get("filter"):
            stages.append(PipelineStage(key="filter", name="Filter"))
        stages.append(PipelineStage(key="classify", name="Classify"))
        return PipelineConfig(
            name=f"trapq {self.name}",
            slug=self.slug,
            version=self.version,
            description=(f"trapq pipeline {self.name}@{self.version} "
                         f"({' + '.join(a.name for a in algorithms)})"),
            algorithms=algorithms,
            stages=stages,
        )


def slug_of(name: str, version: int) -> str:
    """Each version its own Antenna pipeline, so a job on a slug runs exactly that version."""
    return f"trapq-{re.sub(r'[^a-z0-9-]+', '-', name.lower())}-v{version}"


def algorithm_key(model: dict[str, Any]) -> str:
    identity = model.get("sha256") or json.dumps(
        {k: model.get(k) for k in ("labels", "input_size")}, sort_keys=True
    )
    digest = hashlib.sha256(str(identity).encode()).hexdigest()[:12]
    return f"trapq-{model['name']}-{digest}"


def positions(served: Sequence[ServedPipeline]) -> dict[str, dict[str, int]]:
    """Each classifying algorithm's key -> the position of each label in its category map:
    the POSITIONS context that answers are serialized with."""
    return {
        algorithm_key(model): {label: i for i, label in enumerate(model["labels"])}
        for p in served for role in ("filter", "classifier")
        if isinstance(model := p.spec.get(role), dict) and model.get("labels")
    }


def classification(c: ClassificationRecord, ref: AlgorithmReference, terminal: bool,
                   at: datetime) -> ClassificationResponse:
    """The compact form: the top-k labels and scores, highest first."""
    ranked = list(c.topk) or [(c.label, c.score)]
    return ClassificationResponse(
        classification=c.label, labels=[label for label, _ in ranked],
        scores=[score for _, score in ranked], algorithm=ref, terminal=terminal, timestamp=at,
    )


def detection(image_id: str, box: DetectionRecord, detector: AlgorithmReference,
              classifiers: dict[str, tuple[AlgorithmReference, bool]],
              at: datetime) -> DetectionResponse:
    return DetectionResponse(
        source_image_id=image_id,
        bbox=BoundingBox(x1=box.x1, y1=box.y1, x2=box.x2, y2=box.y2),
        algorithm=detector, timestamp=at,
        classifications=[classification(c, *classifiers[c.classifier], at)
                         for c in box.classifications if c.classifier in classifiers],
    )


def answer(task: EndedTask, boxes: list[DetectionRecord], served: ServedPipeline,
           now: datetime) -> dict[str, Any]:
    """The `result` of one task in the compact form: its image listed (processed, even with
    nothing found) and its detections, or the work item's error."""
    if task.state != ItemState.DONE:
        failed = PipelineResultsError(error=task.error or "not processed", image_id=task.image_id)
        return failed.model_dump(mode="json", exclude_none=True)
    at = task.finished_at or now
    detector = served.reference("detector")
    assert detector is not None
    classifiers = served.classifiers()
    result = PipelineResultsResponse(
        pipeline=served.slug,
        total_time=max((at - task.first_received_at).total_seconds(), 0.0),
        source_images=[SourceImage(id=task.image_id, url=task.image_url)],
        detections=[detection(task.image_id, b, detector, classifiers, at) for b in boxes],
    )
    return result.model_dump(mode="json", exclude_none=True)
