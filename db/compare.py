"""Two jobs side by side over the captures both have done: which detections pair up, whether
their classifiers agree, and how each scores against verified labels.

Detections pair by source when one job reused the other's boxes (or both reused the same
job's): a copy and its original are the same box by construction. The rest pair by overlap
within a capture: the assignment that maximises the total IoU (Hungarian, scipy's
linear_sum_assignment), keeping pairs with IoU >= 0.5, so one greedy early choice cannot
steal a box from a better pair. The queries and the arithmetic live here; the printing is
tasks.commands.versions'.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.errors import NoSuchJob
from db.models import Capture, Classification, Detection, JobCapture
from db.pipelines import StoredPipeline, job_pipeline, job_pipelines
from db.reuse import stored_boxes
from db.states import ItemState

IOU_MATCH = 0.5
ROLES = ("classifier", "filter")


@dataclass
class Box:
    """One detection as compared: its pairing key, box, and top-1 label per classifier role."""

    key: int  # the original detection's id: its own, or the one it copies
    x1: float
    y1: float
    x2: float
    y2: float
    detector_label: str
    labels: dict[str, str] = field(default_factory=dict)  # role -> top-1 label

    @property
    def label(self) -> str:
        """What the pipeline calls it: the species classifier's label, else the filter's (a
        crop the filter rejected never reaches the classifier), else the detector's."""
        return self.labels.get("classifier") or self.labels.get("filter") or self.detector_label


@dataclass(frozen=True)
class TruthBox:
    uri: str
    x1: float
    y1: float
    x2: float
    y2: float
    label: str


@dataclass(frozen=True)
class Agreement:
    role: str
    classifier_a: str
    classifier_b: str
    compared: int  # matched pairs that both classified in this role
    agree: int

    @property
    def rate(self) -> float | None:
        return self.agree / self.compared if self.compared else None


@dataclass(frozen=True)
class TruthScores:
    job_id: int
    captures: int  # verified captures that both jobs have done
    truths: int
    predictions: int
    matched: int
    correct: int

    @property
    def precision(self) -> float | None:
        return self.matched / self.predictions if self.predictions else None

    @property
    def recall(self) -> float | None:
        return self.matched / self.truths if self.truths else None

    @property
    def accuracy(self) -> float | None:
        """Share of the matched boxes whose label is the verified one."""
        return self.correct / self.matched if self.matched else None


@dataclass
class Comparison:
    job_a: int
    job_b: int
    captures_a: int  # done by A
    captures_b: int
    captures_both: int
    matched: int = 0
    matched_by_source: int = 0
    only_a: int = 0
    only_b: int = 0
    agreement: list[Agreement] = field(default_factory=list)
    changes: list[tuple[str, str, int]] = field(default_factory=list)  # (label A, label B, n)
    label_counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    truth: list[TruthScores] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_a": self.job_a,
            "job_b": self.job_b,
            "captures": {"a": self.captures_a, "b": self.captures_b, "both": self.captures_both},
            "detections": {
                "matched": self.matched,
                "matched_by_source": self.matched_by_source,
                "only_a": self.only_a,
                "only_b": self.only_b,
            },
            "agreement": [
                {"role": a.role, "classifier_a": a.classifier_a, "classifier_b": a.classifier_b,
                 "compared": a.compared, "agree": a.agree, "rate": a.rate}
                for a in self.agreement
            ],
            "changes": [{"a": a, "b": b, "n": n} for a, b, n in self.changes],
            "label_counts": {k: {"a": a, "b": b} for k, (a, b) in self.label_counts.items()},
            "truth": [
                {"job": t.job_id, "captures": t.captures, "truths": t.truths,
                 "predictions": t.predictions, "matched": t.matched, "correct": t.correct,
                 "precision": t.precision, "recall": t.recall, "accuracy": t.accuracy}
                for t in self.truth
            ],
        }


def compare_jobs(
    session: Session,
    job_a: int,
    job_b: int,
    *,
    truth: Sequence[TruthBox] = (),
    top_changes: int = 10,
    relabel: Mapping[int, Mapping[str, str]] | None = None,
) -> Comparison:
    """Compare two jobs over the captures both have done (see the module's docstring).

    `relabel`, per job, renames species labels and answers before anything is compared, and
    the verified labels with them: e.g. each label to its genus, to compare at that rank."""
    pipelines = job_pipelines(session, [job_a, job_b])
    for job in (job_a, job_b):
        if job not in pipelines:
            raise NoSuchJob(job)
    done_a, done_b = _done(session, job_a), _done(session, job_b)
    both = sorted(done_a & done_b)
    result = Comparison(job_a, job_b, len(done_a), len(done_b), len(both))
    boxes_a, boxes_b = _boxes(session, job_a, both), _boxes(session, job_b, both)
    if relabel:
        for job, boxes in ((job_a, boxes_a), (job_b, boxes_b)):
            _rename(boxes, relabel.get(job, {}))

    changed: Counter[tuple[str, str]] = Counter()
    agree: dict[str, list[int]] = {role: [0, 0] for role in ROLES}
    counts_a: Counter[str] = Counter()
    counts_b: Counter[str] = Counter()
    for cid in both:
        a, b = boxes_a.get(cid, []), boxes_b.get(cid, [])
        counts_a.update(x.label for x in a)
        counts_b.update(x.label for x in b)
        pairs, by_source = pair_boxes(a, b)
        result.matched += len(pairs)
        result.matched_by_source += by_source
        result.only_a += len(a) - len(pairs)
        result.only_b += len(b) - len(pairs)
        for i, j in pairs:
            for role in ROLES:
                la, lb = a[i].labels.get(role), b[j].labels.get(role)
                if la is not None and lb is not None:
                    agree[role][0] += 1
                    agree[role][1] += la == lb
            if a[i].label != b[j].label:
                changed[(a[i].label, b[j].label)] += 1

    for role in ROLES:
        name_a, name_b = _model_name(pipelines[job_a], role), _model_name(pipelines[job_b], role)
        if name_a or name_b:
            result.agreement.append(
                Agreement(role, name_a or "-", name_b or "-", agree[role][0], agree[role][1])
            )
    result.changes = [(a, b, n) for (a, b), n in changed.most_common(top_changes)]
    labels = sorted(set(counts_a) | set(counts_b), key=lambda k: (-(counts_a[k] + counts_b[k]), k))
    result.label_counts = {k: (counts_a[k], counts_b[k]) for k in labels}
    if truth:
        uris = _uris(session, both)
        for job, boxes in ((job_a, boxes_a), (job_b, boxes_b)):
            names = (relabel or {}).get(job, {})
            verified = [replace(t, label=names.get(t.label, t.label)) for t in truth]
            result.truth.append(score_against_truth(job, boxes, uris, verified))
    return result


def pair_boxes(a: Sequence[Box], b: Sequence[Box]) -> tuple[list[tuple[int, int]], int]:
    """One capture's pairs (index in a, index in b), and how many of them paired by source."""
    pairs: list[tuple[int, int]] = []
    index_b = {x.key: j for j, x in enumerate(b)}
    left_a, used_b = [], set()
    for i, x in enumerate(a):
        j = index_b.get(x.key)
        if j is not None and j not in used_b:
            pairs.append((i, j))
            used_b.add(j)
        else:
            left_a.append(i)
    by_source = len(pairs)
    left_b = [j for j in range(len(b)) if j not in used_b]
    for i, j in match_by_iou([_xyxy(a[i]) for i in left_a], [_xyxy(b[j]) for j in left_b]):
        pairs.append((left_a[i], left_b[j]))
    return pairs, by_source


def match_by_iou(
    a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], threshold: float = IOU_MATCH
) -> list[tuple[int, int]]:
    """The one-to-one pairs of greatest total IoU, each with IoU >= threshold."""
    if not len(a) or not len(b):
        return []
    iou = iou_matrix(a, b)
    # Pairs under the threshold weigh nothing, so the assignment spends no overlap on them
    # and pairs as many boxes as it can above it.
    rows, cols = linear_sum_assignment(np.where(iou >= threshold, iou, 0.0), maximize=True)
    return [(int(i), int(j)) for i, j in zip(rows, cols, strict=True) if iou[i, j] >= threshold]


def iou_matrix(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> np.ndarray:
    """Pairwise intersection over union of (x1, y1, x2, y2) boxes, shape (len(a), len(b))."""
    pa = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    pb = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(pa[:, None, :2], pb[None, :, :2])
    rb = np.minimum(pa[:, None, 2:], pb[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(pa[:, 2:] - pa[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(pb[:, 2:] - pb[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def score_against_truth(
    job_id: int,
    boxes: dict[int, list[Box]],
    uris: dict[int, str],
    truth: Iterable[TruthBox],
) -> TruthScores:
    """Precision, recall and label accuracy over the verified captures in `uris`."""
    by_uri: dict[str, list[TruthBox]] = defaultdict(list)
    for t in truth:
        by_uri[_plain(t.uri)].append(t)
    captures = truths = predictions = matched = correct = 0
    for cid, uri in uris.items():
        verified = by_uri.get(_plain(uri))
        if verified is None:
            continue
        found = boxes.get(cid, [])
        captures += 1
        truths += len(verified)
        predictions += len(found)
        pairs = match_by_iou(
            [_xyxy(x) for x in found], [(t.x1, t.y1, t.x2, t.y2) for t in verified]
        )
        matched += len(pairs)
        correct += sum(found[i].label == verified[j].label for i, j in pairs)
    return TruthScores(job_id, captures, truths, predictions, matched, correct)


def _rename(boxes: dict[int, list[Box]], names: Mapping[str, str]) -> None:
    for found in boxes.values():
        for box in found:
            label = box.labels.get("classifier")
            if label is not None:
                box.labels["classifier"] = names.get(label, label)


def _xyxy(x: Box) -> tuple[float, float, float, float]:
    return (x.x1, x.y1, x.x2, x.y2)


def _plain(uri: str) -> str:
    return uri.removeprefix("file://")


def _model_name(pipeline: StoredPipeline, role: str) -> str | None:
    model = pipeline.model(role)
    return model.name if model is not None else None


def _done(session: Session, job_id: int) -> set[int]:
    return set(
        session.scalars(
            select(JobCapture.capture_id).where(
                JobCapture.job_id == job_id, JobCapture.state == ItemState.DONE.value
            )
        )
    )


def _uris(session: Session, capture_ids: Sequence[int]) -> dict[int, str]:
    rows = session.execute(select(Capture.id, Capture.uri).where(Capture.id.in_(capture_ids)))
    return {cid: uri for cid, uri in rows}


def _boxes(session: Session, job_id: int, capture_ids: Sequence[int]) -> dict[int, list[Box]]:
    """The job's detections on these captures with the top-1 label of each classifier role."""
    if not capture_ids:
        return {}
    pipeline = job_pipeline(session, job_id)
    role_of = {_model_name(pipeline, role): role for role in reversed(ROLES)}
    by_id: dict[int, Box] = {}
    out: dict[int, list[Box]] = {}
    for cid, stored in stored_boxes(session, job_id, capture_ids).items():
        out[cid] = [Box(b.source, b.x1, b.y1, b.x2, b.y2, b.label) for b in stored]
        by_id.update(zip((b.id for b in stored), out[cid], strict=True))
    classes = session.execute(
        select(Classification.detection_id, Classification.classifier, Classification.label)
        .join(Detection, Detection.id == Classification.detection_id)
        .where(Detection.job_id == job_id, Detection.capture_id.in_(capture_ids))
    )
    for det_id, classifier, label in classes:
        role = role_of.get(classifier)
        if role is not None:
            by_id[det_id].labels[role] = label
    return out
