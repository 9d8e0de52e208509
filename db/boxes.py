"""A detection box and its classifications: the one record db/ reads and writes them as, and
the one reader of the stored boxes of given work items (`item_boxes`).

The results writer (db.results) takes the engine's output as it is, without a copy:
inference.types.Detection and Classification have these fields under these names
(tests/test_box_records.py holds them to it), since db and inference never import each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from db.models import Classification, Detection


@dataclass(frozen=True)
class ClassificationRecord:
    classifier: str
    label: str
    score: float
    topk: Sequence[tuple[str, float]] = ()  # highest first, the top-1 included
    rank: str | None = None  # with a taxonomy: the rank of `label`, a label or a higher taxon
    source: str | None = None  # prediction_source; None: written before issue #24
    probabilities: bytes | None = None  # the full softmax, float16 (written, never read back)


@dataclass(frozen=True)
class DetectionRecord:
    """A box in original-image pixels, (x1, y1) top-left, (x2, y2) bottom-right."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    label: str
    classifications: list[ClassificationRecord] = field(default_factory=list)
    id: int | None = None  # its row; None before it is written
    # The original detection of a copied box (re-classification); db.reuse's reads give an
    # original its own id, so all copies of a box share one.
    source: int | None = None
    occurrence_id: int | None = None  # the individual it is a sighting of, once tracked
    embedding: bytes | None = None  # float16 features for tracking (TRAPQ_STORE_EMBEDDINGS)

    def classification(self, classifier: str) -> ClassificationRecord | None:
        """This classifier's answer for the box, or None if it gave none."""
        return next((k for k in self.classifications if k.classifier == classifier), None)


def item_boxes(
    session: Session, items: Sequence[tuple[int, int]]
) -> dict[tuple[int, int], list[DetectionRecord]]:
    """Detections and classifications of (job id, capture id) items, in detection order."""
    found: dict[tuple[int, int], list[DetectionRecord]] = {item: [] for item in items}
    if not items:
        return found
    d, k = Detection, Classification
    rows = session.execute(
        select(d.job_id, d.capture_id, d.id, d.x1, d.y1, d.x2, d.y2, d.score, d.label,
               k.classifier, k.label, k.score, k.topk)
        .outerjoin(k, k.detection_id == d.id)
        .where(tuple_(d.job_id, d.capture_id).in_(list(items)))
        .order_by(d.id, k.id)
    )
    last: DetectionRecord | None = None
    for job_id, cap_id, det_id, x1, y1, x2, y2, score, label, name, k_label, k_score, topk in rows:
        if last is None or last.id != det_id:
            last = DetectionRecord(x1, y1, x2, y2, score, label, id=det_id)
            found[(job_id, cap_id)].append(last)
        if name is not None:
            ranked = tuple((str(lbl), float(sc)) for lbl, sc in topk or ())
            last.classifications.append(ClassificationRecord(name, k_label, k_score, ranked))
    return found
