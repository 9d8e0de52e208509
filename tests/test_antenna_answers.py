"""What Antenna reads from trapq's answers: the job store keeps each classification's top-k
(labels and scores), and what is posted puts the scores at their labels' positions in the
registered category map, as Antenna reads them, short enough for a 29,176-label head."""

from __future__ import annotations

from datetime import UTC, datetime

from db.antenna import EndedTask
from db.boxes import ClassificationRecord, DetectionRecord
from db.states import ItemState
from tasks.antenna.answers import ServedPipeline, answer, positions
from tasks.antenna.schemas import POSITIONS, PipelineResultsResponse, TaskResult
from tests.antenna_mock import read_as_antenna

N_LABELS = 29_176
LABELS = [f"species {i}" for i in range(N_LABELS)]
TOPK = [("species 29000", 0.61), ("species 5", 0.2), ("species 17000", 0.1),
        ("species 3", 0.05), ("species 12", 0.01)]


def served() -> ServedPipeline:
    spec = {
        "detector": {"name": "det", "sha256": "d" * 64, "labels": ["moth"]},
        "classifier": {"name": "global", "sha256": "c" * 64, "labels": LABELS},
        "filter": None,
    }
    return ServedPipeline("global", 1, "f" * 64, spec)


def ended() -> tuple[EndedTask, list[DetectionRecord]]:
    at = datetime(2026, 12, 5, tzinfo=UTC)
    task = EndedTask(1, "img-7", "https://example.org/7.jpg", "trapq-global-v1", 1, 1,
                     ItemState.DONE.value, None, at, at)
    box = DetectionRecord(10, 20, 110, 220, 0.9, "moth", [
        ClassificationRecord("global", TOPK[0][0], TOPK[0][1], tuple(TOPK)),
    ])
    return task, [box]


def maps_of(pipeline: ServedPipeline) -> dict[str, list[str]]:
    return {a.key: a.category_map.labels for a in pipeline.config().algorithms
            if a.category_map is not None}


def test_stored_answers_keep_the_top_k_and_posted_ones_are_read_right_by_antenna() -> None:
    pipeline = served()
    task, boxes = ended()
    stored = answer(task, boxes, pipeline, datetime.now(UTC))
    [c] = stored["detections"][0]["classifications"]
    assert c["labels"] == [label for label, _ in TOPK] and len(c["scores"]) == 5

    wire = TaskResult.model_validate({"reply_subject": "s", "result": stored}).model_dump_json(
        exclude_none=True, context={POSITIONS: positions([pipeline])})
    sent = TaskResult.model_validate_json(wire)
    assert isinstance(sent.result, PipelineResultsResponse)
    saved, problems = read_as_antenna(sent.result, maps_of(pipeline))
    assert problems == []
    [read] = saved
    assert (read.taxon, read.score) == TOPK[0]
    assert read.top_n == TOPK[:3], "Classification.top_n shows trapq's top 3"
    assert len(sent.result.detections[0].classifications[0].scores) == N_LABELS
    assert len(wire) < 3 * N_LABELS, f"{len(wire)} bytes: zeros are written 0, 2 bytes a label"


def test_top_k_scores_highest_first_would_be_read_as_the_first_labels_of_the_map() -> None:
    """The form trapq posted before: Antenna would show species 0-2 as the top 3."""
    pipeline = served()
    task, boxes = ended()
    stored = answer(task, boxes, pipeline, datetime.now(UTC))
    stored["detections"][0]["classifications"][0].pop("labels")
    result = PipelineResultsResponse.model_validate(stored)
    _, problems = read_as_antenna(result, maps_of(pipeline))
    assert problems and "position 0" in problems[0]
