"""The demo models through the whole path: generator -> import -> enqueue -> worker -> PostgreSQL.

A fresh seed that training never saw; boxes and kinds are read back from the database and
matched to the generator's ground truth, so a bug anywhere in between (coordinates scaled
wrong, crops misaligned, labels shuffled, rows lost) shows as lost accuracy.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from sqlalchemy import Engine, select

from db.models import Capture, Classification, Detection
from synthetic.evaluate import Scores, score_image
from synthetic.scenes import generate_night
from tests.trapq_cli import trapq
from tests.worker_jobs import (
    classifications_per_detection,
    detections_per_capture,
    item_states,
    job_state,
)
from tests.worker_process import wait_for

FRESH_SEED = 777_001  # not among the training seeds


def boxes_from_db(engine: Engine, job_id: int) -> dict[str, tuple[list[list[float]], list[str]]]:
    """Per capture file name: its boxes and the classifier's kinds, as stored."""
    out: dict[str, tuple[list[list[float]], list[str]]] = defaultdict(lambda: ([], []))
    with engine.connect() as conn:
        rows = conn.execute(
            select(Capture.uri, Detection.x1, Detection.y1, Detection.x2, Detection.y2,
                   Classification.label)
            .join(Detection, Detection.capture_id == Capture.id)
            .join(Classification, Classification.detection_id == Detection.id)
            .where(Detection.job_id == job_id, Classification.classifier == "demo_classifier")
        )
        for uri, x1, y1, x2, y2, label in rows:
            boxes, kinds = out[Path(uri.removeprefix("file://")).name]
            boxes.append([x1, y1, x2, y2])
            kinds.append(label)
    return out


def test_demo_models_find_and_name_insects_end_to_end(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory
) -> None:
    night = tmp_path / "night"
    truths = generate_night(night, n=8, seed=FRESH_SEED)
    env = dict(service_env, TRAPQ_DETECTOR="demo_detector", TRAPQ_CLASSIFIER="demo_classifier")
    assert trapq(env, "import", str(night), "--deployment", "fresh-night").returncode == 0
    enq = trapq(env, "enqueue", "fresh-night", "--chunk-size", "4")
    assert enq.returncode == 0, enq.stderr
    job_id = int(enq.stdout.strip())
    worker_factory(env).start()

    wait_for(lambda: job_state(clean_pg, job_id) == "done", 600, "the job to end")
    assert item_states(clean_pg, job_id) == {"done": 8}

    n_detections = sum(detections_per_capture(clean_pg, job_id).values())
    assert classifications_per_detection(clean_pg, job_id, "demo_classifier") == {
        1: n_detections
    }, "one kind per box: none lost, none doubled"
    stored = boxes_from_db(clean_pg, job_id)
    total = Scores()
    for truth in truths:
        boxes, kinds = stored.get(truth.file, ([], []))
        for x1, y1, x2, y2 in boxes:
            assert 0 <= x1 < x2 <= truth.width and 0 <= y1 < y2 <= truth.height
        total = total + score_image(boxes, kinds, truth.boxes, truth.kinds)
    assert total.truths > 50, "the night should hold dozens of insects"
    assert total.recall >= 0.90, total.summary()
    assert total.precision >= 0.90, total.summary()
    assert total.kind_accuracy >= 0.90, total.summary()
