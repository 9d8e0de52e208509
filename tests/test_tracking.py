"""Tracking: insects linked across captures into occurrences, in numpy and in the job store."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, func, select

from db.imports import get_or_create_deployment, insert_captures
from db.models import Capture, Detection, Job, Occurrence, TrackLink
from db.results import write_results
from db.session import make_sessionmaker
from inference.tracking import (
    Frame,
    TrackParams,
    label_vote,
    night_of,
    split_nights,
    track_baseline,
    track_night,
)
from inference.types import Classification, ItemResult
from inference.types import Detection as Det
from synthetic.nights import generate_tracked_night, outline_box, plan_night
from tasks.settings import Settings
from tasks.tracking import track_job
from tests.fault_scenarios import wait_job_end
from tests.trapq_cli import one_line_error, trapq
from tests.worker_jobs import (
    ENDED,
    job_state,
    make_job,
    plan_job,
    send,
    worker_env,
    worker_pipeline,
    write_jpegs,
)
from tests.worker_process import wait_for

W, H = 1920, 1080


def frame(t: float, boxes: list[tuple[float, float, float, float]], first_id: int,
          emb: list[list[float]] | None = None) -> Frame:
    return Frame(t, W, H, np.arange(first_id, first_id + len(boxes)),
                 np.asarray(boxes, np.float32).reshape(-1, 4),
                 None if emb is None else np.asarray(emb, np.float32))


def test_an_insect_missed_for_two_captures_keeps_its_identity_and_neighbours_stay_apart(
) -> None:
    a, b = (100, 100, 140, 150), (400, 300, 430, 340)
    frames = [
        frame(0, [a, b], 0),
        frame(60, [b], 2),  # a missed
        frame(120, [b], 3),  # a missed again
        frame(180, [(103, 102, 143, 151), b], 4),  # a back, shifted a little
    ]
    tracks = track_night(frames, TrackParams())
    track_of = dict(zip(tracks.detection_ids.tolist(), tracks.track.tolist(), strict=True))
    assert track_of[0] == track_of[4] != track_of[1]
    assert track_of[1] == track_of[2] == track_of[3] == track_of[5]
    assert tracks.n_tracks == 2
    prev = dict(zip(tracks.detection_ids.tolist(), tracks.previous.tolist(), strict=True))
    assert prev[4] == 0 and prev[0] == -1  # the link skips the gap and keeps its cost
    cost = dict(zip(tracks.detection_ids.tolist(), tracks.cost.tolist(), strict=True))
    assert 0 < cost[4] < TrackParams().max_cost and np.isnan(cost[0])
    # the companion app's tracker compares with the previous capture only: a new identity
    base = track_baseline(frames)
    base_of = dict(zip(base.detection_ids.tolist(), base.track.tolist(), strict=True))
    assert base_of[4] != base_of[0]


def test_assignment_is_global_and_embeddings_break_a_tie_of_geometry() -> None:
    """Two insects of two species swap nothing when one walks next to the other: the
    species' features keep each detection with its own track."""
    moth, fly = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    frames = [
        frame(0, [(100, 100, 140, 140), (200, 100, 240, 140)], 0, [moth, fly]),
        frame(60, [(150, 100, 190, 140), (160, 100, 200, 140)], 2, [fly, moth]),
    ]
    tracks = track_night(frames, TrackParams())
    track_of = dict(zip(tracks.detection_ids.tolist(), tracks.track.tolist(), strict=True))
    assert track_of[3] == track_of[0] and track_of[2] == track_of[1]


def test_a_track_gone_longer_than_the_gates_is_a_new_individual() -> None:
    box = (100, 100, 140, 140)
    p = TrackParams(max_missed=5, max_gap_s=600)
    late = track_night([frame(0, [box], 0), frame(3600, [box], 1)], p)
    assert late.n_tracks == 2  # same place, an hour later: the time gate
    far = track_night([frame(0, [box], 0), frame(60, [(1500, 900, 1540, 940)], 1)], p)
    assert far.n_tracks == 2  # the distance gate


def test_nights_split_where_the_trap_paused_and_span_midnight() -> None:
    start = datetime(2026, 6, 21, 21, 0)
    times = [start + timedelta(minutes=30 * i) for i in range(12)]  # 21:00 .. 02:30
    times += [start + timedelta(days=1, minutes=30 * i) for i in range(3)]
    nights = split_nights(times, timedelta(hours=2))
    assert [len(n) for n in nights] == [12, 3]
    assert night_of(times[11]) == night_of(times[0]) == start.date()
    assert night_of(times[12]) == start.date() + timedelta(days=1)


def test_label_vote_weighs_scores_and_agreement() -> None:
    assert label_vote(["a", "b", "b"], [0.9, 0.3, 0.3]) == ("a", pytest.approx(0.3))
    assert label_vote(["a", "b", "b"], [0.5, 0.4, 0.4]) == ("b", pytest.approx(0.8 / 3))


def _planned_results(seed: int, n: int, ids: list[int]) -> tuple[list[ItemResult], set[int]]:
    """True boxes of a planned night as a worker would write them (one species label each)."""
    results, individuals = [], set()
    for cap, key in zip(plan_night(seed, n), ids, strict=True):
        dets = []
        for p in cap.placements:
            individuals.add(p.individual)
            x1, y1, x2, y2 = outline_box(p.kind, p.cx, p.cy, p.r, p.theta)
            c = Classification("demo_classifier", p.kind, 0.9, [(p.kind, 0.9)])
            dets.append(Det(x1, y1, x2, y2, 0.95, "insect", [c]))
        results.append(ItemResult(key, f"c{key}", W, H, dets))
    return results, individuals


def test_tracking_a_job_twice_leaves_one_set_of_occurrences(clean_pg: Engine) -> None:
    factory = make_sessionmaker(clean_pg)
    n = 40
    start = datetime(2026, 6, 21, 21, 0, tzinfo=UTC)
    with factory.begin() as s:
        dep = get_or_create_deployment(s, "tracked")
        insert_captures(s, dep, [
            {"uri": f"c{i}", "captured_at": start + timedelta(minutes=i), "width": W,
             "height": H} for i in range(n)
        ])
        plan = plan_job(s, dep, chunk_size=n)
        ids = list(s.scalars(select(Capture.id).order_by(Capture.captured_at)))
    results, individuals = _planned_results(5, n, ids)
    with factory.begin() as s:
        write_results(s, plan.job_id, results)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    first = track_job(factory, plan.job_id, settings)
    second = track_job(factory, plan.job_id, settings)
    assert first.occurrences == second.occurrences
    with factory() as s:
        n_occ = s.scalar(select(func.count()).select_from(Occurrence))
        n_det = s.scalar(select(func.count()).select_from(Detection))
        unlinked = s.scalar(select(func.count()).where(Detection.occurrence_id.is_(None)))
        n_links = s.scalar(select(func.count()).select_from(TrackLink))
        gathered = s.scalar(select(func.sum(Occurrence.n_detections)))
        tracked_at = s.scalar(select(Job.tracked_at).where(Job.id == plan.job_id))
    assert n_occ == second.occurrences and unlinked == 0 and gathered == n_det
    assert n_links == n_det - n_occ  # every detection but a track's first has one link
    assert abs(n_occ - len(individuals)) <= 0.1 * len(individuals)
    assert tracked_at is not None


def test_worker_tracks_a_job_when_its_last_chunk_ends(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory,
) -> None:
    """A tracked night through `trapq import`, `trapq enqueue`, a real worker with the demo
    models, then the tracking task the last chunk sends; `trapq occurrences` reads it back."""
    night = tmp_path / "night"
    truths = generate_tracked_night(night, 10, seed=3, size=(960, 540))
    individuals = {i.individual for t in truths for i in t.insects}
    env = worker_env(service_env, TRAPQ_DETECTOR="demo_detector", TRAPQ_RANDOM_WEIGHTS="false",
                     TRAPQ_STORE_EMBEDDINGS="true")
    worker = worker_factory(env, pool="threads", concurrency=1).start()
    assert trapq(env, "import", str(night), "--deployment", "night").returncode == 0
    done = trapq(env, "enqueue", "night", "--chunk-size", "4")
    assert done.returncode == 0, done.stderr
    job_id = int(done.stdout.split()[-1])
    wait_for(lambda: job_state(clean_pg, job_id) in ENDED, 300, "job end", on_timeout=worker.tail)

    def tracked() -> bool:
        with clean_pg.connect() as conn:
            return conn.scalar(select(Job.tracked_at).where(Job.id == job_id)) is not None

    wait_for(tracked, 60, "tracking after the job", on_timeout=worker.tail)
    with clean_pg.connect() as conn:
        n_occ = conn.scalar(select(func.count()).select_from(Occurrence))
        n_det = conn.scalar(select(func.count()).select_from(Detection))
        unlinked = conn.scalar(select(func.count()).where(Detection.occurrence_id.is_(None)))
        sizes = set(conn.scalars(select(func.length(Detection.embedding))))
    assert 0 < n_occ < n_det and unlinked == 0
    assert sizes == {128 * 2}  # every detection: the demo classifier's 128 features, float16
    assert abs(n_occ - len(individuals)) <= max(2, 0.25 * len(individuals)), (n_occ, individuals)
    shown = trapq(env, "occurrences", str(job_id), "--csv", str(tmp_path / "occ.csv"),
                  "--plot", str(tmp_path / "abundance.png"), "--doubtful", "2")
    assert shown.returncode == 0, shown.stderr
    assert "costliest links" in shown.stdout
    assert f"{n_occ} occurrences from {n_det} detections" in shown.stdout
    assert len((tmp_path / "occ.csv").read_text().splitlines()) == n_occ + 1
    assert (tmp_path / "abundance.png").read_bytes()[:4] == b"\x89PNG"
    again = trapq(env, "track", str(job_id))
    assert again.returncode == 0, again.stderr
    with clean_pg.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Occurrence)) == n_occ


def test_occurrences_of_an_untracked_or_unknown_job_is_one_line_saying_what_to_do(
    service_env: dict[str, str], clean_pg: Engine
) -> None:
    job = make_job(clean_pg, ["a.jpg"], chunk_size=1)
    assert "run `trapq track" in one_line_error(trapq(service_env, "occurrences", str(job.job_id)))
    assert "no job 999999" in one_line_error(trapq(service_env, "track", "999999"))


def test_a_job_that_ends_failed_is_tracked_too(
    tmp_path: Path, clean_pg: Engine, shared_worker,
) -> None:
    """Its last chunk fails (the job's classifier weights are gone, so its pipeline cannot
    load): the failure path sends the tracking task as the success path does."""
    spec = worker_pipeline()
    gone = dataclasses.replace(spec.classifier, weights=str(tmp_path / "gone.pt"), sha256="0" * 64)
    paths = write_jpegs(tmp_path / "images", 2)
    job = make_job(clean_pg, [str(p) for p in paths], chunk_size=2,
                   spec=dataclasses.replace(spec, classifier=gone))
    worker = shared_worker()
    send(worker.env, clean_pg, job.chunk_ids)
    assert wait_job_end(clean_pg, job.job_id, worker) == "failed"

    def tracked() -> bool:
        with clean_pg.connect() as conn:
            return conn.scalar(select(Job.tracked_at).where(Job.id == job.job_id)) is not None

    wait_for(tracked, 60, "tracking after the failed job", on_timeout=worker.tail)
