"""Tracking against true identities: trapq's tracker and the companion app's, side by side.

Nights come from synthetic.nights (insects arrive, sit, shift, hide, leave). Scoring is at the
detection level, so a night of thousands of captures runs in seconds on a CPU: the detector is
simulated from the true boxes (misses, jitter, a few false boxes) and so are the classifier's
top-1 and its embeddings. The embeddings are synthetic per individual (a species centroid, an
individual offset, per-sighting noise) with their spread MEASURED in the same run: the demo
classifier's penultimate features on crops of a rendered tracked night give the cosine
distances between sightings of one individual, of two individuals of one species and of two
species, and the synthetic model reproduces those three medians. Rendering every capture of a
long night would cost minutes; rendering a few dozen for the calibration costs seconds.

Side by side in one run:
  (a) trapq (inference.tracking.track_night, the frozen TRAPQ_TRACK_* defaults) and the
      baseline (track_baseline: previous capture only, greedy, cost <= 1.0) on nights the
      tuning never saw: IDF1, MOTA, ID switches (motmetrics), and occurrences per species
      (score-weighted vote) against the true individuals;
  (b) scale: one night of --scale-captures captures x ~20 detections, tracked as it streams,
      with its time and peak memory.

    .venv/bin/python -m bench.tracking [--captures 200] [--nights 1] [--scale-captures 10000]
                                       [--store]   # --store: track_job on PostgreSQL too
    .venv/bin/python -m bench.tracking --tune   # grid search on the tuning seeds (not scored)
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # `python bench/tracking.py` runs as `python -m bench.tracking` would
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import itertools
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import motmetrics as mm
import numpy as np
from PIL import Image
from sqlalchemy import select

from db.models import Capture
from inference.tracking import Frame, NightTracks, TrackParams, label_vote, track_baseline
from inference.tracking import track_night as trapq_track
from synthetic.nights import NightBehaviour, outline_box, plan_night
from synthetic.scenes import KINDS, render_placements
from tasks.settings import Settings
from tasks.tracking import track_params

TUNING_SEEDS = (101, 102)  # --tune looks at these only
EVAL_SEEDS = (7, 8, 9, 10)  # never tuned on
SIZE = (1920, 1080)
DIM = 128  # the demo classifier's penultimate width


@dataclass(frozen=True)
class EmbeddingModel:
    """Synthetic features: normalise(species centroid + individual offset + sighting noise)."""

    sigma_individual: float
    sigma_sighting: float
    species_cosine: float  # cosine between two species' centroids

    @classmethod
    def from_distances(cls, same: float, same_kind: float, other_kind: float) -> EmbeddingModel:
        # for unit centroids, E|a - b|^2 / 2 of the two noise terms is sigma^2 * DIM
        return cls(float(np.sqrt(max(same_kind - same, 1e-6) / DIM)),
                   float(np.sqrt(max(same, 1e-6) / DIM)), float(1.0 - other_kind))


class DemoClassifier:
    """The demo classifier on crops: penultimate features (pooled, before ``fc``) and top-1,
    from one forward, as the worker computes them."""

    def __init__(self) -> None:
        import torch

        from inference.architectures import tiny_classifier
        from inference.registry import REGISTRY

        entry = REGISTRY["demo_classifier"]
        assert entry.default_weights is not None
        state = torch.load(entry.default_weights, map_location="cpu", weights_only=True)
        self.model = tiny_classifier(state["fc.weight"].shape[0])
        self.model.load_state_dict(state)
        self.model.eval()
        self.entry = entry
        assert entry.default_labels is not None
        names = Path(entry.default_labels).read_text().split()
        self.kind_of_output = np.array([KINDS.index(n) for n in names])

    def __call__(self, image: Image.Image, boxes: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import torch

        from inference.crops import crop_and_resize, normalize

        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
        x = normalize(crop_and_resize(pixels, torch.from_numpy(boxes), self.entry.input_size),
                      self.entry.mean, self.entry.std)
        with torch.inference_mode():
            feats = self.model.features(x)
            probs = self.model.fc(feats).softmax(dim=1)
        score, top = probs.max(dim=1)
        return feats.numpy(), self.kind_of_output[top.numpy()], score.numpy()


@dataclass(frozen=True)
class Simulated:
    """What the simulated detector saw in one night, and the truth behind it."""

    frames: list[Frame]
    truth_ids: list[np.ndarray]  # per capture: individuals visible
    truth_boxes: list[np.ndarray]
    hyp_truth: list[np.ndarray]  # per capture, per detection: its individual, -1 if false
    labels: np.ndarray  # per detection (night order): top-1 kind index
    scores: np.ndarray
    individual_kind: dict[int, int]  # every individual visible at least once


def simulate(seed: int, n: int, emb: EmbeddingModel | None,
             behaviour: NightBehaviour | None = None, p_miss: float = 0.03,
             jitter: float = 0.02, false_per_capture: float = 0.05, accuracy: float = 0.95,
             with_truth: bool = True, classifier: DemoClassifier | None = None) -> Simulated:
    """Detections of a planned night: true boxes jittered by ``jitter`` of their size, each
    missed with ``p_miss``, a Poisson number of false boxes. With ``classifier`` every capture
    is rendered and features and top-1 come from the demo classifier on the crops (false
    boxes crop bare sheet and debris); else they are synthetic (``emb``; top-1 right with
    ``accuracy``)."""
    rng = np.random.default_rng((seed, 99))
    common = rng.normal(size=DIM)
    common /= np.linalg.norm(common)
    centroids = rng.normal(size=(len(KINDS), DIM))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    a = np.sqrt(max(emb.species_cosine, 0.0)) if emb is not None else 0.0
    centroids = a * common + np.sqrt(1 - a * a) * centroids
    offsets: dict[int, np.ndarray] = {}
    kind_index = {k: i for i, k in enumerate(KINDS)}
    out = Simulated([], [], [], [], np.zeros(0, np.int64), np.zeros(0), {})
    labels, scores = [], []
    next_det = 0
    for cap in plan_night(seed, n, SIZE, behaviour):
        ids, boxes, kinds = [], [], []
        image = None
        if classifier is not None:
            image, insects = render_placements((seed, cap.index), SIZE, cap.placements, seed)
            drawn = [(i.individual, i.box, i.kind) for i in insects]
        else:
            drawn = [(p.individual, outline_box(p.kind, p.cx, p.cy, p.r, p.theta), p.kind)
                     for p in cap.placements]
        for ident, box, kind in drawn:
            ids.append(ident)
            boxes.append(box)
            kinds.append(kind_index[kind])
            out.individual_kind.setdefault(ident, kind_index[kind])
        tb = np.asarray(boxes, np.float32).reshape(-1, 4)
        seen = rng.random(len(ids)) >= p_miss
        w, h = tb[:, 2] - tb[:, 0], tb[:, 3] - tb[:, 1]
        wh = np.stack([w, h, w, h], axis=1)
        db = tb + rng.normal(0, jitter, tb.shape).astype(np.float32) * wh
        n_false = int(rng.poisson(false_per_capture))
        fb = []
        for _ in range(n_false):
            x, y, s = rng.uniform(0, SIZE[0] - 60), rng.uniform(0, SIZE[1] - 60), rng.uniform(8, 50)
            fb.append((x, y, x + s, y + s))
        keep = np.concatenate([seen, np.ones(n_false, bool)])
        det_boxes = np.concatenate([db, np.asarray(fb, np.float32).reshape(-1, 4)])[keep]
        hyp_truth = np.concatenate([np.asarray(ids, np.int64), np.full(n_false, -1)])[keep]
        true_kind = np.concatenate([np.asarray(kinds, np.int64),
                                    rng.integers(len(KINDS), size=n_false)])[keep]
        if image is not None and classifier is not None:
            det_vecs, top, score = classifier(image, det_boxes)
            labels.append(top)
            scores.append(score)
        else:
            assert emb is not None
            vecs = []
            for k, ident in zip(true_kind, hyp_truth, strict=True):
                if ident < 0:
                    vecs.append(rng.normal(size=DIM))
                    continue
                if ident not in offsets:
                    offsets[ident] = rng.normal(0, emb.sigma_individual, DIM)
                vecs.append(centroids[k] + offsets[ident]
                            + rng.normal(0, emb.sigma_sighting, DIM))
            det_vecs = np.asarray(vecs, np.float32).reshape(-1, DIM)
            right = rng.random(len(true_kind)) < accuracy
            wrong = (true_kind + rng.integers(1, len(KINDS), size=len(true_kind))) % len(KINDS)
            labels.append(np.where(right, true_kind, wrong))
            scores.append(np.where(right, rng.uniform(0.6, 1.0, len(right)),
                                   rng.uniform(0.3, 0.6, len(right))))
        m = len(det_boxes)
        out.frames.append(Frame(cap.taken_at.timestamp(), SIZE[0], SIZE[1],
                                np.arange(next_det, next_det + m, dtype=np.int64), det_boxes,
                                det_vecs.astype(np.float16)))
        next_det += m
        if with_truth:
            out.truth_ids.append(np.asarray(ids, np.int64))
            out.truth_boxes.append(tb)
            out.hyp_truth.append(hyp_truth)
    return replace(out, labels=np.concatenate(labels), scores=np.concatenate(scores))


def iou_distance(a: np.ndarray, b: np.ndarray, max_distance: float = 0.5) -> np.ndarray:
    """1 - IoU of x1y1x2y2 boxes, NaN (no match) past ``max_distance``: motmetrics' own
    iou_matrix, which calls np.asfarray, is gone with NumPy 2."""
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = iw.clip(0) * ih.clip(0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    d = 1.0 - inter / (area_a[:, None] + area_b[None, :] - inter)
    return np.where(d > max_distance, np.nan, d)


def mot_scores(sim: Simulated, tracks: NightTracks) -> dict[str, float]:
    acc = mm.MOTAccumulator(auto_id=True)
    track_of = dict(zip(tracks.detection_ids.tolist(), tracks.track.tolist(), strict=True))
    for f, ids, tb in zip(sim.frames, sim.truth_ids, sim.truth_boxes, strict=True):
        hyp = [track_of[d] for d in f.detection_ids.tolist()]
        acc.update(ids.tolist(), hyp, iou_distance(tb, f.boxes.astype(np.float32)))
    summary = mm.metrics.create().compute(acc, metrics=["idf1", "mota", "num_switches"])
    row = summary.iloc[0]
    return {"idf1": float(row["idf1"]), "mota": float(row["mota"]),
            "idsw": float(row["num_switches"])}


def occurrences_per_kind(sim: Simulated, tracks: NightTracks) -> tuple[Counter[int], int]:
    """One occurrence per track, labelled by the score-weighted vote of its detections; and
    how many tracks hold false boxes only (no insect at all)."""
    order = np.argsort(tracks.detection_ids)  # detection ids are the night's positions
    track = tracks.track[order]
    truth = np.concatenate(sim.hyp_truth)
    counts: Counter[int] = Counter()
    false_only = 0
    by_track = np.argsort(track, kind="stable")
    bounds = np.flatnonzero(np.diff(track[by_track])) + 1
    for members in np.split(by_track, bounds):
        if members.size:
            label, _ = label_vote(sim.labels[members].tolist(), sim.scores[members].tolist())
            counts[int(label)] += 1
            false_only += int((truth[members] < 0).all())
    return counts, false_only


def feature_distances(sim: Simulated) -> tuple[float, float, float]:
    """Median cosine distances of a night's features between sightings of one individual, of
    two individuals of one species and of two species (true detections only)."""
    f = np.concatenate([fr.embeddings for fr in sim.frames if fr.embeddings is not None])
    ids = np.concatenate(sim.hyp_truth)
    f = f[ids >= 0].astype(np.float32)
    ids = ids[ids >= 0]
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    pick = np.random.default_rng(0).permutation(len(ids))[:1500]
    f, ids = f[pick], ids[pick]
    kinds = np.array([sim.individual_kind[int(i)] for i in ids])
    d = 1.0 - f @ f.T
    same = np.equal.outer(ids, ids)
    same_kind = np.equal.outer(kinds, kinds)
    off = ~np.eye(len(ids), dtype=bool)
    return (float(np.median(d[same & off])), float(np.median(d[same_kind & ~same])),
            float(np.median(d[~same_kind])))


def render_nights(seeds: tuple[int, ...], n: int, classifier: DemoClassifier
                  ) -> list[Simulated]:
    return [simulate(seed, n, None, classifier=classifier) for seed in seeds]


def evaluate(sims: list[Simulated], params: TrackParams) -> dict[str, dict[str, float]]:
    totals: dict[str, dict[str, float]] = {}
    true_kinds: Counter[int] = Counter()
    found: dict[str, Counter[int]] = {"trapq": Counter(), "baseline": Counter()}
    for sim in sims:
        true_kinds.update(sim.individual_kind.values())
        runs = {"trapq": trapq_track(sim.frames, params), "baseline": track_baseline(sim.frames)}
        for name, tracks in runs.items():
            t = totals.setdefault(name, {"idf1": 0.0, "mota": 0.0, "idsw": 0.0})
            for k, v in mot_scores(sim, tracks).items():
                t[k] += v / len(sims) if k != "idsw" else v
            counts, false_only = occurrences_per_kind(sim, tracks)
            found[name].update(counts)
            t["false_only"] = t.get("false_only", 0.0) + false_only
    for name, t in totals.items():
        errors = [abs(found[name][k] - true_kinds[k]) / true_kinds[k] for k in true_kinds]
        t["occurrences"] = float(sum(found[name].values()))
        t["individuals"] = float(sum(true_kinds.values()))
        t["worst_species_error"] = max(errors)
        t["species_within_10pct"] = float(sum(e <= 0.10 for e in errors))
        t["species"] = float(len(errors))
        t["per_species"] = {KINDS[k]: (found[name][k], true_kinds[k])  # type: ignore[assignment]
                            for k in sorted(true_kinds)}
    return totals


def tune(sims: list[Simulated]) -> TrackParams:
    """Grid search on the tuning nights: the mean IDF1, then fewer ID switches."""
    grid = {
        "w_embedding": (1.0, 10.0, 100.0),
        "w_distance": (1.0, 5.0, 10.0),
        "max_cost": (1.0, 2.0, 3.0),
        "max_distance": (0.1, 0.15, 0.25),
        "max_missed": (3, 5, 8),
    }
    best: tuple[float, float, TrackParams] | None = None
    for values in itertools.product(*grid.values()):
        params = replace(TrackParams(), **dict(zip(grid, values, strict=True)))
        scores = [mot_scores(sim, trapq_track(sim.frames, params)) for sim in sims]
        key = (float(np.mean([s["idf1"] for s in scores])),
               -float(np.sum([s["idsw"] for s in scores])))
        if best is None or key > best[:2]:
            best = (*key, params)
            print(f"  idf1 {key[0]:.4f} idsw {-key[1]:.0f} {params}")
    assert best is not None
    return best[2]


def streamed(sim_frames: list[Frame]) -> Iterator[Frame]:
    """The night as a stream, as the job store hands it to the tracker."""
    yield from sim_frames


def scale_run(n: int, emb: EmbeddingModel, params: TrackParams, store: bool
              ) -> dict[str, float]:
    """One long dense night: ~20 detections per capture, tracked as it streams; with
    ``store``, also through the job store (store_run)."""
    behaviour = NightBehaviour(mean_present=21.0, median_stay=60.0)
    t0 = time.perf_counter()
    sim = simulate(1234, n, emb, behaviour, with_truth=False)
    generate_s = time.perf_counter() - t0
    n_det = sum(len(f.detection_ids) for f in sim.frames)
    night_bytes = sum(f.boxes.nbytes + f.detection_ids.nbytes
                      + (f.embeddings.nbytes if f.embeddings is not None else 0)
                      for f in sim.frames)
    t0 = time.perf_counter()
    tracks = trapq_track(streamed(sim.frames), params)
    track_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    track_baseline(streamed(sim.frames))
    baseline_s = time.perf_counter() - t0
    tracemalloc.start()
    trapq_track(streamed(sim.frames), params)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"captures": n, "detections": n_det, "tracks": tracks.n_tracks,
            "generate_s": generate_s, "track_s": track_s, "baseline_s": baseline_s,
            "tracker_peak_mb": peak / 2**20, "night_mb": night_bytes / 2**20,
            **(store_run(sim) if store else {})}


def store_run(sim: Simulated) -> dict[str, float]:
    """The same night through the job store on PostgreSQL: its detections (embedding and
    species label each) written by write_results, then tasks.tracking.track_job reads the
    night, tracks it and writes occurrences, links and detection refs; run twice (it replaces
    the night), the second time under tracemalloc for its peak."""
    from db.imports import get_or_create_deployment, insert_captures
    from db.results import write_results
    from db.session import make_engine, make_sessionmaker
    from inference.types import Classification, Detection, ItemResult
    from tasks.tracking import track_job
    from tests.services import temporary_database
    from tests.worker_jobs import plan_job

    start = datetime(2026, 6, 21, 21, 0, tzinfo=UTC)
    with temporary_database("trapq_bench_tracking") as url:
        engine = make_engine(url)
        factory = make_sessionmaker(engine)
        try:
            with factory.begin() as s:
                dep = get_or_create_deployment(s, "scale-night")
                insert_captures(s, dep, [
                    {"uri": f"night/{i:06d}.jpg",
                     "captured_at": start + timedelta(seconds=f.taken_at - sim.frames[0].taken_at),
                     "width": f.width, "height": f.height}
                    for i, f in enumerate(sim.frames)
                ])
                job = plan_job(s, dep, chunk_size=len(sim.frames))
                ids = list(s.scalars(select(Capture.id).order_by(Capture.id)))
            t0 = time.perf_counter()
            offset = 0
            for first in range(0, len(sim.frames), 200):
                results = []
                for cid, f in zip(ids[first:first + 200], sim.frames[first:first + 200],
                                  strict=True):
                    assert f.embeddings is not None
                    dets = []
                    for box, vec in zip(f.boxes.tolist(), f.embeddings, strict=True):
                        label = KINDS[int(sim.labels[offset])]
                        c = Classification("demo_classifier", label, float(sim.scores[offset]))
                        dets.append(Detection(*box, 0.9, "insect", [c], embedding=vec.tobytes()))
                        offset += 1
                    results.append(ItemResult(cid, "", f.width, f.height, dets))
                with factory.begin() as s:
                    write_results(s, job.job_id, results)
            write_s = time.perf_counter() - t0
            settings = Settings(_env_file=None)  # type: ignore[call-arg]
            first_run = track_job(factory, job.job_id, settings)
            tracemalloc.start()
            track_job(factory, job.job_id, settings)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        finally:
            engine.dispose()
    return {"write_s": write_s, "track_job_s": first_run.seconds,
            "occurrences": first_run.occurrences, "track_job_peak_mb": peak / 2**20}


def params_from_settings() -> TrackParams:
    """The frozen defaults, as the worker reads them (TRAPQ_TRACK_*)."""
    return track_params(Settings(_env_file=None))  # type: ignore[call-arg]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captures", type=int, default=200, help="rendered captures per night")
    ap.add_argument("--nights", type=int, default=1, help="held-out nights scored (max 4)")
    ap.add_argument("--scale-captures", type=int, default=10_000)
    ap.add_argument("--tune", action="store_true", help="grid search on the tuning seeds")
    ap.add_argument("--store", action="store_true",
                    help="also track the scale night through PostgreSQL (TRAPQ_TEST_PG_URL)")
    args = ap.parse_args()
    classifier = DemoClassifier()
    if args.tune:
        t0 = time.perf_counter()
        sims = render_nights(TUNING_SEEDS, args.captures, classifier)
        print(f"tuning on seeds {TUNING_SEEDS}, {args.captures} rendered captures each "
              f"({time.perf_counter() - t0:.1f} s to render and classify)")
        print(f"best: {tune(sims)}")
        return
    params = params_from_settings()
    seeds = EVAL_SEEDS[: max(1, min(args.nights, len(EVAL_SEEDS)))]
    t0 = time.perf_counter()
    sims = render_nights(seeds, args.captures, classifier)
    render_s = time.perf_counter() - t0
    res = evaluate(sims, params)
    same, same_kind, other_kind = feature_distances(sims[0])
    print(f"held-out nights {seeds}, {args.captures} rendered captures each, demo classifier "
          f"features ({render_s:.1f} s to render and classify); median cosine distance: "
          f"same individual {same:.4f}, same species {same_kind:.4f}, other species "
          f"{other_kind:.4f}")
    print(f"{'tracker':10} {'IDF1':>7} {'MOTA':>7} {'IDsw':>6} {'occurrences':>12} "
          f"{'individuals':>12} {'species within 10%':>19} {'worst species':>14}")
    for name, r in res.items():
        print(f"{name:10} {r['idf1']:7.4f} {r['mota']:7.4f} {r['idsw']:6.0f} "
              f"{r['occurrences']:12.0f} {r['individuals']:12.0f} "
              f"{r['species_within_10pct']:12.0f} of {r['species']:.0f} "
              f"{r['worst_species_error']:13.1%}")
    for name, r in res.items():
        print(f"  {name}: {r['false_only']:.0f} occurrences are tracks of false boxes only")
    for name, r in res.items():
        per = ", ".join(f"{k} {f}/{t}" for k, (f, t) in r["per_species"].items())  # type: ignore[union-attr]
        print(f"  {name} occurrences/individuals: {per}")
    emb = EmbeddingModel.from_distances(same, same_kind, other_kind)
    sc = scale_run(args.scale_captures, emb, params, args.store)
    print(f"scale: {sc['captures']} captures, {sc['detections']} detections -> "
          f"{sc['tracks']} tracks in {sc['track_s']:.2f} s "
          f"({sc['captures'] / sc['track_s']:.0f} captures/s; baseline {sc['baseline_s']:.2f} s), "
          f"tracker peak {sc['tracker_peak_mb']:.1f} MiB over a night of "
          f"{sc['night_mb']:.1f} MiB (simulated in {sc['generate_s']:.1f} s)")
    if args.store:
        print(f"job store: the same night written in {sc['write_s']:.1f} s; track_job (read, "
              f"track, write {sc['occurrences']:.0f} occurrences) {sc['track_job_s']:.1f} s, "
              f"peak {sc['track_job_peak_mb']:.0f} MiB")
    t, b = res["trapq"], res["baseline"]
    print(
        f"RESULT idf1={t['idf1']:.4f} idf1_baseline={b['idf1']:.4f} "
        f"idf1_gain={t['idf1'] - b['idf1']:.4f} mota={t['mota']:.4f} "
        f"mota_baseline={b['mota']:.4f} idsw={t['idsw']:.0f} idsw_baseline={b['idsw']:.0f} "
        f"occurrences={t['occurrences']:.0f} individuals={t['individuals']:.0f} "
        f"occurrences_baseline={b['occurrences']:.0f} "
        f"worst_species_error={t['worst_species_error']:.3f} "
        f"scale_captures={sc['captures']} scale_detections={sc['detections']} "
        f"scale_track_s={sc['track_s']:.2f} scale_peak_mb={sc['tracker_peak_mb']:.1f}"
        + (f" store_track_job_s={sc['track_job_s']:.1f} store_peak_mb="
           f"{sc['track_job_peak_mb']:.0f}" if args.store else "")
    )


if __name__ == "__main__":
    main()
