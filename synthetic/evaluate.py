"""Detection and kind accuracy of predicted boxes against a night's ground truth.

Takes plain lists so that the same measure serves the training script (boxes straight from the
models) and the end-to-end test (boxes read back from the database).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Box = Sequence[float]  # x1, y1, x2, y2 in pixels


@dataclass(frozen=True)
class Scores:
    truths: int = 0
    predictions: int = 0
    matched: int = 0
    kind_correct: int = 0

    def __add__(self, other: Scores) -> Scores:
        return Scores(
            self.truths + other.truths,
            self.predictions + other.predictions,
            self.matched + other.matched,
            self.kind_correct + other.kind_correct,
        )

    @property
    def recall(self) -> float:
        return self.matched / self.truths if self.truths else 1.0

    @property
    def precision(self) -> float:
        return self.matched / self.predictions if self.predictions else 1.0

    @property
    def kind_accuracy(self) -> float:
        """Share of matched boxes whose predicted kind is the true one."""
        return self.kind_correct / self.matched if self.matched else 1.0

    def summary(self) -> str:
        return (
            f"recall={self.recall:.3f} precision={self.precision:.3f} "
            f"kind_accuracy={self.kind_accuracy:.3f} truths={self.truths} "
            f"predictions={self.predictions} matched={self.matched}"
        )


def iou_matrix(a: Sequence[Box], b: Sequence[Box]) -> np.ndarray:
    """Pairwise intersection over union, shape (len(a), len(b))."""
    pa = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    pb = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(pa[:, None, :2], pb[None, :, :2])
    rb = np.minimum(pa[:, None, 2:], pb[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(pa[:, 2:] - pa[:, :2], axis=1)
    area_b = np.prod(pb[:, 2:] - pb[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match(predicted: Sequence[Box], truth: Sequence[Box],
          iou_threshold: float = 0.5) -> list[tuple[int, int]]:
    """Greedy one-to-one matching, best overlap first: (prediction index, truth index) pairs."""
    iou = iou_matrix(predicted, truth)
    pairs: list[tuple[int, int]] = []
    used_p: set[int] = set()
    used_t: set[int] = set()
    order = np.argsort(-iou, axis=None, kind="stable")
    for flat in order:
        p, t = divmod(int(flat), iou.shape[1])
        if iou[p, t] < iou_threshold:
            break
        if p not in used_p and t not in used_t:
            pairs.append((p, t))
            used_p.add(p)
            used_t.add(t)
    return pairs


def score_image(predicted: Sequence[Box], predicted_kinds: Sequence[str], truth: Sequence[Box],
                truth_kinds: Sequence[str], iou_threshold: float = 0.5) -> Scores:
    """Counts for one capture; add the results of several captures with ``+`` or ``sum``."""
    pairs = match(predicted, truth, iou_threshold)
    correct = sum(predicted_kinds[p] == truth_kinds[t] for p, t in pairs)
    return Scores(len(truth), len(predicted), len(pairs), correct)
