"""Re-classification through real workers on PostgreSQL: a job that reuses another job's boxes
skips the detector, writes copies pointing at the original detections exactly once, and
`trapq compare` sets it beside the original, with a second, deliberately weaker classifier."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from sqlalchemy import Engine, select, text

from db.compare import Box, match_by_iou, pair_boxes
from db.models import Chunk, Classification, Detection, Job
from db.session import make_sessionmaker
from synthetic.scenes import generate_night
from synthetic.train import TRAIN_STREAM, render_pool, train_classifier
from tests.test_worker_faults import slow_image_server  # noqa: F401
from tests.trapq_cli import one_line_error, trapq
from tests.worker_jobs import (
    BOXES_PER_IMAGE,
    chunk_rows,
    item_states,
    job_state,
    kill_trial_env,
    make_job,
    plan_job,
    send,
)
from tests.worker_process import wait_for

NIGHT_SEED = 777_014
N_CAPTURES = 4


def weak_classifier(path: Path) -> Path:
    """A demo classifier trained for seconds on a handful of scenes: a worse checkpoint of the
    same architecture and labels, as a hurried retraining would give."""
    pool = render_pool(seed=3, stream=TRAIN_STREAM, n=3, processes=1)
    gen = torch.Generator().manual_seed(3)
    torch.save(train_classifier(pool, steps=8, batch=32, lr=3e-3, gen=gen).state_dict(), path)
    return path


def demo_env(service_env: dict[str, str], **overrides: str) -> dict[str, str]:
    return dict(
        service_env,
        TRAPQ_DETECTOR="demo_detector",
        TRAPQ_CLASSIFIER="demo_classifier",
        TRAPQ_HEARTBEAT_S="0.5",
        TRAPQ_BATCH_SIZE="2",
        MKL_NUM_THREADS="1",
        **overrides,
    )


def enqueue(env: dict[str, str], *args: str) -> int:
    result = trapq(env, "enqueue", "night", "--chunk-size", "2", *args)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip())


def detections(engine: Engine, job_id: int) -> list[tuple[int, int, tuple[float, ...], int | None]]:
    """(id, capture, box, source) of the job's detections, in id order."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(Detection.id, Detection.capture_id, Detection.x1, Detection.y1, Detection.x2,
                   Detection.y2, Detection.source_detection_id)
            .where(Detection.job_id == job_id).order_by(Detection.id)
        )
        return [(i, c, (x1, y1, x2, y2), s) for i, c, x1, y1, x2, y2, s in rows]


def top1(engine: Engine, job_id: int) -> dict[int, str]:
    """Detection id -> the classifier's top-1 label."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(Classification.detection_id, Classification.label)
            .join(Detection, Detection.id == Classification.detection_id)
            .where(Detection.job_id == job_id)
        )
        return {det_id: label for det_id, label in rows}


def wait_done(engine: Engine, job_id: int) -> None:
    wait_for(lambda: job_state(engine, job_id) in ("done", "failed"), 300, f"job {job_id}")
    assert item_states(engine, job_id) == {"done": N_CAPTURES}


@pytest.mark.timeout(900)
def test_reclassification_reuses_stored_boxes_and_compare_pairs_them_by_source(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory
) -> None:
    night = tmp_path / "night"
    truths = generate_night(night, n=N_CAPTURES, seed=NIGHT_SEED)
    env = demo_env(service_env)
    assert trapq(env, "import", str(night), "--deployment", "night").returncode == 0
    first = worker_factory(env).start()

    full = enqueue(env)
    wait_done(clean_pg, full)
    originals = detections(clean_pg, full)
    assert len(originals) > 20
    # Move one stored box by 3 px: a job that reuses boxes must carry it, one that ran the
    # detector again could not.
    moved_id = originals[0][0]
    with clean_pg.begin() as conn:
        conn.execute(text("UPDATE detections SET x1 = x1 + 3 WHERE id = :d"), {"d": moved_id})
    originals = detections(clean_pg, full)

    again = enqueue(env, "--reuse-detections-from", str(full))
    with clean_pg.connect() as conn:
        chunk_ids = list(conn.scalars(select(Chunk.id).where(Chunk.job_id == again)))
    send(env, clean_pg, chunk_ids)  # every chunk delivered twice
    wait_done(clean_pg, again)
    # Both deliveries of every chunk ran to their end (the later one found its chunk claimed
    # or done and wrote nothing): each message's task ends in the worker's log.
    wait_for(lambda: _ended_runs(first.log_text(), again) == 2 * len(chunk_ids), 120,
             "both deliveries of every chunk to end", on_timeout=first.tail)
    copies = detections(clean_pg, again)
    by_id = {d[0]: d for d in originals}
    assert len(copies) == len(originals)
    assert sorted(d[3] for d in copies) == sorted(by_id)  # each original copied exactly once
    for _, capture, box, source in copies:
        assert by_id[source][1:3] == (capture, box)
    labels_full, labels_again = top1(clean_pg, full), top1(clean_pg, again)
    assert {d[3]: labels_again[d[0]] for d in copies} == labels_full  # same classifier
    with clean_pg.connect() as conn:
        assert conn.scalar(select(Job.boxes_from_job_id).where(Job.id == again)) == full

    # The same worker runs the retrained job: a worker serves each job's own pipeline.
    weak = weak_classifier(tmp_path / "weak_classifier.pt")
    weak_env = demo_env(service_env, TRAPQ_CLASSIFIER_WEIGHTS=str(weak))
    retrained = trapq(weak_env, "enqueue", "night", "--chunk-size", "2", "--reuse-detections")
    assert f", boxes of job {again}" in retrained.stderr  # the newest done job: itself a copy
    retrained_id = int(retrained.stdout.strip())
    wait_done(clean_pg, retrained_id)
    # Copies of copies point at the originals, so every job of these boxes pairs by source.
    assert sorted(d[3] for d in detections(clean_pg, retrained_id)) == sorted(by_id)

    truth_csv = tmp_path / "verified.csv"
    with truth_csv.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["uri", "x1", "y1", "x2", "y2", "label"])
        for t in truths:
            for insect in t.insects:
                out.writerow([str(night / t.file), *insect.box, insect.kind])
    shown = trapq(weak_env, "compare", str(full), str(retrained_id), "--truth", str(truth_csv),
                  "--format", "json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    n = len(originals)
    assert report["captures"] == {"a": N_CAPTURES, "b": N_CAPTURES, "both": N_CAPTURES}
    assert report["detections"] == {"matched": n, "matched_by_source": n, "only_a": 0,
                                    "only_b": 0}
    [agreement] = report["agreement"]
    assert agreement["role"] == "classifier" and agreement["compared"] == n
    assert agreement["agree"] < n, "the weak classifier should disagree somewhere"
    assert sum(c["n"] for c in report["changes"]) <= n - agreement["agree"]
    assert {k: v["a"] for k, v in report["label_counts"].items() if v["a"]} == dict(
        _counts(labels_full.values())
    )
    strong, hurried = report["truth"]
    assert strong["captures"] == hurried["captures"] == N_CAPTURES
    assert strong["truths"] == sum(len(t.insects) for t in truths)
    assert strong["recall"] >= 0.9 and strong["precision"] >= 0.9
    assert strong["matched"] == hurried["matched"]  # same boxes, other labels
    assert strong["accuracy"] > hurried["accuracy"]

    table = trapq(weak_env, "compare", str(full), str(retrained_id))
    assert table.returncode == 0, table.stderr
    assert f"job {full} (A) vs job {retrained_id} (B): {N_CAPTURES} captures" in table.stdout
    assert "labels that changed most" in table.stdout


def _ended_runs(log: str, job_id: int) -> int:
    """Chunk tasks of the job that ended (Celery's `succeeded` line, under the shadow name
    tasks.producer gives each message)."""
    return sum(1 for line in log.splitlines()
               if f" · job {job_id} · chunk " in line and "] succeeded in " in line)


def _counts(labels: object) -> dict[str, int]:
    out: dict[str, int] = {}
    for label in labels:  # type: ignore[attr-defined]
        out[label] = out.get(label, 0) + 1
    return out


def test_reuse_refuses_a_job_with_another_detector(
    service_env: dict[str, str], clean_pg: Engine, tmp_path: Path
) -> None:
    night = tmp_path / "night"
    generate_night(night, n=1, seed=NIGHT_SEED)
    env = demo_env(service_env)
    assert trapq(env, "import", str(night), "--deployment", "night").returncode == 0
    first = enqueue(env)
    other = demo_env(service_env, TRAPQ_BOX_THRESHOLD="0.3")

    error = one_line_error(trapq(other, "enqueue", "night", "--reuse-detections-from",
                                 str(first)))

    assert error == (
        f"error: --reuse-detections-from {first}: job {first} ran another box threshold than "
        "the one configured now; re-classification keeps the detector and box threshold "
        "(`trapq status` lists jobs)"
    )


def test_pairs_by_source_first_then_by_the_best_total_overlap() -> None:
    a = [Box(1, 0, 0, 10, 10, "insect"), Box(2, 20, 0, 30, 10, "insect"),
         Box(3, 0, 20, 10, 30, "insect"), Box(4, 50, 50, 60, 60, "insect")]
    # b[0] copies a[1] (and overlaps it too); b[1] overlaps a[0], b[2] a[2]; b[3] is new.
    b = [Box(2, 21, 0, 31, 10, "insect"), Box(9, 0, 2, 10, 14, "insect"),
         Box(8, 0, 19, 10, 29, "insect"), Box(7, 90, 90, 99, 99, "insect")]

    pairs, by_source = pair_boxes(a, b)

    assert by_source == 1
    assert sorted(pairs) == [(0, 1), (1, 0), (2, 2)]


def test_overlap_matching_takes_the_best_assignment_not_the_greedy_one() -> None:
    # Greedy takes the best single pair (a0, b0: IoU 0.90) and leaves a1 with b1 (0.25, no
    # match); the assignment of greatest overlap pairs a0-b1 (0.54) and a1-b0 (0.56).
    a = [(0, 0, 10, 10), (3, 0, 13, 10)]
    b = [(0.5, 0, 10.5, 10), (-3, 0, 7, 10)]

    assert sorted(match_by_iou(a, b)) == [(0, 1), (1, 0)]


def test_reclassification_worker_killed_mid_chunk_copies_every_box_once(
    service_env: dict[str, str], clean_pg: Engine, worker_factory,
    slow_image_server: str,  # noqa: F811
) -> None:
    env = kill_trial_env(service_env)
    n = 12
    uris = [f"{slow_image_server}/img{i}.jpg" for i in range(n)]
    source = make_job(clean_pg, uris, chunk_size=n)
    first = worker_factory(env, concurrency=1).start()
    send(env, clean_pg, source.chunk_ids)
    wait_for(lambda: job_state(clean_pg, source.job_id) == "done", 120, "the source job")
    with make_sessionmaker(clean_pg).begin() as s:  # what `--reuse-detections-from` plans
        dep = s.scalar(select(Job.deployment_id).where(Job.id == source.job_id))
        plan = plan_job(s, dep, chunk_size=n, boxes_from_job_id=source.job_id)
    send(env, clean_pg, plan.chunk_ids)
    wait_for(lambda: item_states(clean_pg, plan.job_id).get("done", 0) >= 4, 60,
             "some captures re-classified", on_timeout=first.tail)
    first.kill()
    assert item_states(clean_pg, plan.job_id).get("done", 0) < n, "ended before the kill"

    # Redis hands the chunk out again once past the visibility timeout.
    second = worker_factory(env, concurrency=1).start()
    wait_for(lambda: job_state(clean_pg, plan.job_id) == "done", 120, "the re-classification",
             on_timeout=second.tail)

    assert item_states(clean_pg, plan.job_id) == {"done": n}
    originals = {d[0] for d in detections(clean_pg, source.job_id)}
    copies = detections(clean_pg, plan.job_id)
    assert len(originals) == n * BOXES_PER_IMAGE
    assert sorted(d[3] for d in copies) == sorted(originals)  # each box once, none lost
    assert chunk_rows(clean_pg, plan.job_id)[0].deliveries >= 2


def test_compare_says_in_one_line_what_is_wrong_with_a_truth_file(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    no_label = tmp_path / "no_label.csv"
    no_label.write_text("uri,x1,y1,x2,y2\n/a.jpg,1,2,3,4\n")
    bad_box = tmp_path / "bad_box.csv"
    bad_box.write_text("uri,x1,y1,x2,y2,label\n/a.jpg,1,2,3,four,moth\n")

    assert one_line_error(trapq(service_env, "compare", "1", "2", "--truth", str(no_label))) == (
        f"error: --truth {no_label}: no column label; the header must name uri,x1,y1,x2,y2,label"
    )
    assert one_line_error(trapq(service_env, "compare", "1", "2", "--truth", str(bad_box))) == (
        f"error: --truth {bad_box}:2: the box must be four numbers"
    )
    assert one_line_error(trapq(service_env, "compare", "1", "2")) == (
        "error: no job 1; `trapq status` lists jobs"
    )
