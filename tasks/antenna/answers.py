"""trapq's pipelines and results in Antenna's words: the pipeline registered for each named
pipeline, and the answer to one task read back from the job store.

An algorithm's key names its model and the bytes of its weights (or, for a seeded random
build, its labels and input size), so results from other weights never share a key, and
Antenna's category map for the key is the classifier's labels, registered once: answers
carry the top-k scores, highest first, and no labels.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from db.antenna import Box, EndedTask
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


def answer(task: EndedTask, boxes: list[Box], served: ServedPipeline,
           now: datetime) -> dict[str, Any]:
    """The `result` of one task: its image listed (processed, even with nothing found) and
    its detections, or the work item's error."""
    if task.state != ItemState.DONE:
        failed = PipelineResultsError(error=task.error or "not processed", image_id=task.image_id)
        return failed.model_dump(mode="json", exclude_none=True)
    at = task.finished_at or now
    detector = served.reference("detector")
    assert detector is not None
    refs = {
        ref.name: (ref, role != "filter")
        for role in ("filter", "classifier")
        if (ref := served.reference(role)) is not None
    }
    detections = [
        DetectionResponse(
            source_image_id=task.image_id,
            bbox=BoundingBox(x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2),
            algorithm=detector,
            timestamp=at,
            classifications=[
                ClassificationResponse(
                    classification=c.label,
                    scores=[score for _, score in c.topk],
                    algorithm=refs[c.classifier][0],
                    terminal=refs[c.classifier][1],
                    timestamp=at,
                )
                for c in b.classes
            ],
        )
        for b in boxes
    ]
    result = PipelineResultsResponse(
        pipeline=served.slug,
        total_time=max((at - task.first_received_at).total_seconds(), 0.0),
        source_images=[SourceImage(id=task.image_id, url=task.image_url)],
        detections=detections,
    )
    return result.model_dump(mode="json", exclude_none=True)
