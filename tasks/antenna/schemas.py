"""Antenna's processing-service contract as pydantic models, written from Antenna's
`ami/ml/schemas.py`, `ami/jobs/serializers.py` and `ami/jobs/views.py` (API v2).

What trapq sends is `Sent`: an unknown field is an error. Antenna itself ignores unknown
fields, so a field it would drop silently is a trapq bug, and the mock Antenna of the tests
validates every request with these same models to catch it. What trapq reads from Antenna is
`Read`: a newer Antenna may add fields without breaking the bridge. `client_info` is open by
Antenna's design and `config` is a free dict.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    model_serializer,
)

POSITIONS = "positions"  # serialization context: algorithm key -> {label: its index}


class Sent(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Read(BaseModel):
    model_config = ConfigDict(extra="ignore")


class BoundingBox(Sent):
    """Pixels of the original image, (x1, y1) top-left, (x2, y2) bottom-right."""

    x1: float
    y1: float
    x2: float
    y2: float


class AlgorithmReference(Sent):
    name: str
    key: str


class CategoryMap(Sent):
    """A classifier's labels in output order: registered once, so results can omit them."""

    data: list[dict[str, Any]] = Field(default_factory=list)
    labels: list[str] = Field(default_factory=list)
    version: str | None = None
    description: str | None = None
    uri: str | None = None


class AlgorithmConfig(Sent):
    name: str
    key: str
    description: str | None = None
    task_type: str | None = None  # detection, classification, ...
    version: int = 1
    version_name: str | None = None
    uri: str | None = None
    category_map: CategoryMap | None = None


class ClassificationResponse(Sent):
    """`classification` is the top-1 label. The model holds the compact top-k (`labels` and
    `scores`, highest first), as the job store keeps it; serialized with a POSITIONS
    context, it is what Antenna reads right: `scores` at their labels' positions in the
    registered category map, zero elsewhere (written `0`, two bytes a label), and no
    `labels` (tasks.antenna.answers says why). `logits` are left out, as trapq keeps none."""

    classification: str
    labels: list[str] | None = None
    scores: list[float] = Field(default_factory=list)
    logits: list[float] | None = None
    features: list[float] | None = None
    ood_score: float | None = None
    inference_time: float | None = None
    algorithm: AlgorithmReference
    terminal: bool = True
    timestamp: datetime

    @model_serializer(mode="wrap")
    def _positional(self, handler: SerializerFunctionWrapHandler,
                    info: SerializationInfo) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        if not isinstance(info.context, dict) or POSITIONS not in info.context:
            return out
        out.pop("labels", None)
        where = info.context[POSITIONS].get(self.algorithm.key)
        if where is not None and self.labels is not None:
            dense: list[float] = [0] * len(where)
            for label, score in zip(self.labels, self.scores, strict=True):
                if label in where:
                    dense[where[label]] = score
            out["scores"] = dense
        return out


class DetectionResponse(Sent):
    source_image_id: str
    bbox: BoundingBox | None = None
    inference_time: float | None = None
    algorithm: AlgorithmReference
    timestamp: datetime
    crop_image_url: str | None = None
    classifications: list[ClassificationResponse] = Field(default_factory=list)


class SourceImage(Sent):
    id: str
    url: str


class DetectionRequest(Sent):
    """A box to classify without running the detector (push API re-classification)."""

    source_image: SourceImage
    bbox: BoundingBox | None = None
    crop_image_url: str | None = None
    algorithm: AlgorithmReference


class PipelineRequest(Sent):
    pipeline: str
    source_images: list[SourceImage]
    detections: list[DetectionRequest] | None = None
    config: dict[str, Any] | None = None


class PipelineResultsResponse(Sent):
    """One answer. Antenna records every image in `source_images` as processed, so an image
    listed without detections reads "processed, nothing found": list exactly those processed."""

    pipeline: str
    total_time: float
    source_images: list[SourceImage]
    detections: list[DetectionResponse]
    errors: list[Any] | str | None = None


class PipelineResultsError(Sent):
    """The answer for an image that could not be processed."""

    error: str
    image_id: str | None = None


class PipelineStageParam(Sent):
    name: str
    key: str
    category: str = "default"


class PipelineStage(Sent):
    key: str
    name: str
    params: list[PipelineStageParam] = Field(default_factory=list)
    description: str | None = None


class PipelineConfig(Sent):
    """One pipeline as registered; `version` is an integer in Antenna."""

    name: str
    slug: str
    version: int
    description: str | None = None
    algorithms: list[AlgorithmConfig] = Field(default_factory=list)
    stages: list[PipelineStage] = Field(default_factory=list)


class ProcessingServiceInfoResponse(Sent):
    name: str
    description: str | None = None
    pipelines: list[PipelineConfig] = Field(default_factory=list)
    algorithms: list[AlgorithmConfig] = Field(default_factory=list)


class ClientInfo(BaseModel):
    """Who is asking (host, software, version): open by Antenna's design."""

    model_config = ConfigDict(extra="allow")


class PipelineRegistrationRequest(Sent):
    """Body of POST /projects/{id}/pipelines/."""

    processing_service_name: str
    pipelines: list[PipelineConfig] = Field(default_factory=list)


class PipelineRegistrationResponse(Read):
    pipelines_created: list[str] = Field(default_factory=list)
    pipelines_updated: list[str] = Field(default_factory=list)
    processing_service_id: int | None = None


class JobListItem(Read):
    """GET /jobs?ids_only=1 lists only these."""

    id: int
    pipeline_slug: str | None = None


class JobList(Read):
    count: int | None = None
    next: str | None = None
    results: list[JobListItem] = Field(default_factory=list)


class TasksRequest(Sent):
    """Body of POST /jobs/{id}/tasks/."""

    batch_size: int = Field(ge=1)
    client_info: ClientInfo | None = None


class ProcessingTask(Read):
    """One image to process; `reply_subject` is the NATS subject its answer acknowledges."""

    id: str
    image_id: str
    image_url: str
    reply_subject: str | None = None


class TasksResponse(Read):
    """Tasks are kept raw here: a malformed one is answered with an error, not allowed to
    spoil the rest of the batch (see tasks.antenna.client.split_tasks)."""

    tasks: list[dict[str, Any]] = Field(default_factory=list)


class TaskResult(Sent):
    reply_subject: str
    result: PipelineResultsResponse | PipelineResultsError


class ResultsRequest(Sent):
    """Body of POST /jobs/{id}/result/."""

    results: list[TaskResult]
    client_info: ClientInfo | None = None


class ResultsAck(Read):
    status: str
    job_id: int
    results_queued: int
    tasks: list[dict[str, Any]] = Field(default_factory=list)
