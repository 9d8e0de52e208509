"""Link detections of consecutive captures of one night into individual insects (tracks).

A moth that sits on the sheet for an hour is in every capture of that hour; counted per
detection it inflates abundance a hundredfold. This module turns a night's detections into
tracks, one per individual, with nothing but numpy and scipy (no SQL, no Celery, no torch), so
the bench can score it against ground truth and the task layer can run it over the job store.

Two trackers share the cost terms:

- ``track_night`` (trapq's): every capture is matched against all tracks still alive, not just
  the previous capture, with one globally optimal assignment (``linear_sum_assignment``) over a
  weighted cost of embedding distance, IoU, area ratio and centroid distance. A pair is linked
  only inside the gates (distance, time since the track was last seen, captures missed, cost),
  so an insect hidden or missed for up to ``max_missed`` captures keeps its identity.
- ``track_baseline``: the companion app's (ami-data-companion): previous capture only, the
  four terms with weight 1, greedy, linked when the cost is at most 1.0.

Both stream: a night is fed capture by capture and only the tracks still alive are held, so
memory is the night's output arrays (a few numbers per detection) plus the live tracks.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import TypeVar

import numpy as np
from scipy.optimize import linear_sum_assignment

_INFEASIBLE = 1e6
L = TypeVar("L", bound=Hashable)


@dataclass(frozen=True)
class TrackParams:
    """Weights of the cost terms, the gates, and how long a track may go unseen.

    The defaults are tuned on synthetic nights (``python -m bench.tracking --tune``) and frozen;
    tasks.settings exposes each as a TRAPQ_TRACK_* setting.
    """

    w_embedding: float = 1.0  # (1 - cosine similarity) of the classifier's features
    w_iou: float = 1.0  # (1 - IoU)
    w_area: float = 1.0  # (1 - smaller area / larger area)
    w_distance: float = 5.0  # centroid distance / image diagonal
    w_missed: float = 0.1  # per capture the track went unseen: prefer the freshest track
    max_cost: float = 2.0  # gate: pairs costing more are never linked
    max_distance: float = 0.15  # gate: centroid distance / image diagonal
    max_missed: int = 5  # gate: captures a track may go unseen and still be continued
    max_gap_s: float = 1800.0  # gate: seconds since the track was last seen
    embedding_momentum: float = 0.5  # weight of the old appearance in a track's running one


@dataclass(frozen=True)
class Frame:
    """One capture's detections, in the order the tracker must see captures (by time)."""

    taken_at: float  # seconds (any epoch; only differences matter)
    width: int
    height: int
    detection_ids: np.ndarray  # (n,) int64
    boxes: np.ndarray  # (n, 4) x1, y1, x2, y2 in pixels
    embeddings: np.ndarray | None = None  # (n, d); rows need not be normalised


@dataclass(frozen=True)
class NightTracks:
    """Per detection of the night, in the order fed: its track (0-based within the night), the
    detection it was linked from (-1 for a track's first) and that link's cost (NaN if none)."""

    detection_ids: np.ndarray  # int64
    track: np.ndarray  # int64
    previous: np.ndarray  # int64
    cost: np.ndarray  # float32

    @property
    def n_tracks(self) -> int:
        return int(self.track.max()) + 1 if self.track.size else 0


def split_nights(times: Sequence[datetime], gap: timedelta) -> list[range]:
    """Index ranges of ``times`` (sorted) that form sessions: a new one starts after ``gap``
    without a capture. A night spans midnight; a trap that pauses for hours starts a new one."""
    out: list[range] = []
    start = 0
    for i in range(1, len(times)):
        if times[i] - times[i - 1] > gap:
            out.append(range(start, i))
            start = i
    if times:
        out.append(range(start, len(times)))
    return out


def night_of(first: datetime) -> date:
    """A night is named by the evening it starts: a session starting before noon belongs to
    the night that began the day before."""
    return first.date() if first.hour >= 12 else first.date() - timedelta(days=1)


def _normalise(e: np.ndarray) -> np.ndarray:
    e = e.astype(np.float32, copy=False)
    n = np.linalg.norm(e, axis=1, keepdims=True)
    return e / np.maximum(n, 1e-12)


def _terms(
    a: np.ndarray, b: np.ndarray, diag: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(1 - IoU), (1 - area ratio), centroid distance / diagonal for every pair of a x b."""
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    iw = (np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]))
    ih = (np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]))
    inter = iw.clip(0) * ih.clip(0)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)
    lo = np.minimum(area_a[:, None], area_b[None, :])
    hi = np.maximum(area_a[:, None], area_b[None, :])
    ratio = np.where(hi > 0, lo / np.maximum(hi, 1e-9), 0.0)
    ca = np.stack([(a[:, 0] + a[:, 2]) / 2, (a[:, 1] + a[:, 3]) / 2], axis=1)
    cb = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)
    dist = np.linalg.norm(ca[:, None, :] - cb[None, :, :], axis=2) / diag
    return 1.0 - iou, 1.0 - ratio, dist


def _embedding_distance(a: np.ndarray | None, b: np.ndarray | None, shape: tuple[int, int]
                        ) -> np.ndarray:
    """1 - cosine similarity of unit rows; zero where either side has no embedding (an
    all-zero row, or None), so geometry alone decides there."""
    if a is None or b is None:
        return np.zeros(shape, np.float32)
    known = (a != 0).any(axis=1)
    return np.where(known[:, None], 1.0 - np.clip(a @ b.T, -1.0, 1.0), 0.0)


class _Builder:
    """Collects the per-detection output of a night in growing arrays."""

    def __init__(self) -> None:
        self.ids: list[np.ndarray] = []
        self.track: list[np.ndarray] = []
        self.previous: list[np.ndarray] = []
        self.cost: list[np.ndarray] = []

    def add(self, ids: np.ndarray, track: np.ndarray, previous: np.ndarray, cost: np.ndarray
            ) -> None:
        self.ids.append(ids.astype(np.int64, copy=False))
        self.track.append(track)
        self.previous.append(previous)
        self.cost.append(cost)

    def build(self) -> NightTracks:
        if not self.ids:
            empty = np.zeros(0, np.int64)
            return NightTracks(empty, empty, empty, np.zeros(0, np.float32))
        return NightTracks(
            np.concatenate(self.ids),
            np.concatenate(self.track).astype(np.int64),
            np.concatenate(self.previous).astype(np.int64),
            np.concatenate(self.cost).astype(np.float32),
        )


def track_night(frames: Iterable[Frame], params: TrackParams | None = None) -> NightTracks:
    """trapq's tracker: global assignment of each capture's detections to the live tracks."""
    p = params or TrackParams()
    out = _Builder()
    # live tracks, as parallel arrays: id, last box, appearance, last detection, last seen
    t_id = np.zeros(0, np.int64)
    t_box = np.zeros((0, 4), np.float32)
    t_emb: np.ndarray | None = None
    t_last = np.zeros(0, np.int64)
    t_frame = np.zeros(0, np.int64)
    t_time = np.zeros(0, np.float64)
    next_track = 0
    for index, f in enumerate(frames):
        n = len(f.detection_ids)
        alive = (index - t_frame - 1 <= p.max_missed) & (f.taken_at - t_time <= p.max_gap_s)
        t_id, t_box, t_last, t_frame, t_time = (
            t_id[alive], t_box[alive], t_last[alive], t_frame[alive], t_time[alive]
        )
        if t_emb is not None:
            t_emb = t_emb[alive]
        if n == 0:
            continue
        boxes = f.boxes.astype(np.float32, copy=False)
        emb = _normalise(f.embeddings) if f.embeddings is not None else None
        track = np.full(n, -1, np.int64)
        previous = np.full(n, -1, np.int64)
        cost = np.full(n, np.nan, np.float32)
        if len(t_id):
            diag = float(np.hypot(f.width, f.height))
            d_iou, d_area, dist = _terms(t_box, boxes, diag)
            d_emb = _embedding_distance(t_emb, emb, (len(t_id), n))
            missed = (index - t_frame - 1).astype(np.float32)[:, None]
            c = (p.w_embedding * d_emb + p.w_iou * d_iou + p.w_area * d_area
                 + p.w_distance * dist + p.w_missed * missed)
            feasible = (dist <= p.max_distance) & (c <= p.max_cost)
            rows, cols = linear_sum_assignment(np.where(feasible, c, _INFEASIBLE))
            ok = feasible[rows, cols]
            rows, cols = rows[ok], cols[ok]
            track[cols] = t_id[rows]
            previous[cols] = t_last[rows]
            cost[cols] = c[rows, cols]
            # matched tracks move on
            t_box[rows] = boxes[cols]
            t_last[rows] = f.detection_ids[cols]
            t_frame[rows] = index
            t_time[rows] = f.taken_at
            if emb is not None:
                t_emb = _with_width(t_emb, len(t_id), emb.shape[1])
                m = p.embedding_momentum
                old = t_emb[rows]
                known = (old != 0).any(axis=1, keepdims=True)
                t_emb[rows] = np.where(known, _normalise(m * old + (1 - m) * emb[cols]),
                                       emb[cols])
        new = np.flatnonzero(track < 0)
        if new.size:
            track[new] = np.arange(next_track, next_track + new.size)
            next_track += new.size
            t_id = np.concatenate([t_id, track[new]])
            t_box = np.concatenate([t_box, boxes[new]])
            t_last = np.concatenate([t_last, f.detection_ids[new]])
            t_frame = np.concatenate([t_frame, np.full(new.size, index)])
            t_time = np.concatenate([t_time, np.full(new.size, f.taken_at)])
            if emb is not None:
                t_emb = np.concatenate([_with_width(t_emb, len(t_id) - new.size,
                                                    emb.shape[1]), emb[new]])
            elif t_emb is not None:
                t_emb = np.concatenate([t_emb, np.zeros((new.size, t_emb.shape[1]), np.float32)])
        out.add(f.detection_ids, track, previous, cost)
    return out.build()


def _with_width(t_emb: np.ndarray | None, n: int, width: int) -> np.ndarray:
    """The live tracks' appearances, zero rows (unknown) for all if there were none yet."""
    return np.zeros((n, width), np.float32) if t_emb is None else t_emb


def track_baseline(frames: Iterable[Frame], threshold: float = 1.0) -> NightTracks:
    """The companion app's tracker, the yardstick: each detection takes the cheapest detection
    of the previous capture (all four terms weighted 1) if that costs at most ``threshold``.
    Greedy, cheapest pairs first; a detection whose best predecessor is already taken starts a
    track of its own (scoring needs one identity per track per capture)."""
    out = _Builder()
    prev: Frame | None = None
    prev_track = np.zeros(0, np.int64)
    prev_emb: np.ndarray | None = None
    next_track = 0
    for f in frames:
        n = len(f.detection_ids)
        emb = _normalise(f.embeddings) if f.embeddings is not None and n else None
        track = np.full(n, -1, np.int64)
        previous = np.full(n, -1, np.int64)
        cost = np.full(n, np.nan, np.float32)
        if prev is not None and n and len(prev.detection_ids):
            diag = float(np.hypot(f.width, f.height))
            d_iou, d_area, dist = _terms(prev.boxes.astype(np.float32), f.boxes, diag)
            c = _embedding_distance(prev_emb, emb, d_iou.shape) + d_iou + d_area + dist
            best = c.argmin(axis=0)
            best_cost = c[best, np.arange(n)]
            taken: set[int] = set()
            for j in np.argsort(best_cost, kind="stable"):
                i = int(best[j])
                if best_cost[j] <= threshold and i not in taken:
                    taken.add(i)
                    track[j] = prev_track[i]
                    previous[j] = prev.detection_ids[i]
                    cost[j] = best_cost[j]
        new = np.flatnonzero(track < 0)
        track[new] = np.arange(next_track, next_track + new.size)
        next_track += new.size
        if n:
            out.add(f.detection_ids, track, previous, cost)
        prev, prev_track, prev_emb = f, track, emb
    return out.build()


def label_vote(labels: Sequence[L], scores: Sequence[float]) -> tuple[L, float]:
    """A track's label: the one with the largest summed score. Its score is that sum over the
    number of votes, so it falls both with low confidence and with disagreement."""
    total: dict[L, float] = {}
    for label, score in zip(labels, scores, strict=True):
        total[label] = total.get(label, 0.0) + score
    best = max(total, key=lambda k: total[k])
    return best, total[best] / len(labels)
