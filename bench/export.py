"""Peak memory of `trapq export` in every format, on a small job and on 10^6 detections.

Rows are made in PostgreSQL by set-based SQL (INSERT ... SELECT generate_series): captures of
4000x3000 pixels, each done with DETECTIONS_PER_CAPTURE detections of one classification.
Each export runs as the user runs it (`trapq export` in a subprocess); its peak RSS is the
child's ru_maxrss (os.wait4). A streamed export's peak is the same on both jobs: the
difference between the two columns is what the rows cost.

    .venv/bin/python -m bench.export [--n 1000000] [--small 10000] [--formats csv,coco,...]

Environment: TRAPQ_TEST_PG_URL (an admin URL, default postgres@127.0.0.1/test).
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # `python bench/export.py` runs as `python -m bench.export` would
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
import os
import subprocess
import tempfile
import time

from sqlalchemy import Engine, text

from db.pipelines import detector_fingerprint
from db.session import make_engine
from tests.services import temporary_database
from tests.trapq_cli import TRAPQ

FORMATS = ("csv", "jsonl", "camtrapdp", "megadetector", "coco")
DETECTIONS_PER_CAPTURE = 20
LABELS = ["Noctua pronuba", "Agrotis exclamationis", "Autographa gamma", "Xestia c-nigrum"]
PIPELINE = {
    "detector": {"name": "bench_detector", "labels": ["insect"], "sha256": "1" * 64,
                 "input_size": [800, 1333], "weights": "d.pt"},
    "classifier": {"name": "bench_species", "labels": LABELS, "sha256": "2" * 64,
                   "input_size": [224, 224], "weights": "c.pt"},
    "filter": None,
    "box_threshold": 0.5,
    "top_k": 2,
    "filter_negative_label": "nonmoth",
}
CAMTRAP_OPTIONS = ("--project-title", "Bench moths", "--sampling-design", "opportunistic",
                   "--contributor", "Bench <bench@example.org>")


def make_job(engine: Engine, name: str, n_detections: int) -> int:
    """A done job of n_detections detections (and as many classifications); returns its id."""
    n_captures = max(1, n_detections // DETECTIONS_PER_CAPTURE)
    with engine.begin() as conn:
        dep = conn.scalar(text(
            "INSERT INTO deployments (name, created_at, latitude, longitude, capture_method) "
            "VALUES (:name, now(), 52.37, 4.89, 'timeLapse') RETURNING id"), {"name": name})
        conn.execute(text(
            "INSERT INTO captures (deployment_id, uri, captured_at, width, height) "
            "SELECT :dep, 's3://bench/' || :name || '/' || lpad(i::text, 8, '0') || '.jpg', "
            "timestamptz '2024-06-01 21:00Z' + i * interval '10 seconds', 4000, 3000 "
            "FROM generate_series(1, :n) AS i"), {"dep": dep, "name": name, "n": n_captures})
        job = conn.scalar(text(
            "INSERT INTO jobs (deployment_id, state, pipeline, chunk_size, n_captures, n_chunks, "
            "created_at, finished_at, fingerprint, detector_fingerprint, project_id) SELECT :dep, "
            "'done', :pipeline, :n, :n, 1, now(), now(), :fp, :detector, id FROM projects "
            "WHERE name = 'default' RETURNING id"),
            {"dep": dep, "pipeline": json.dumps(PIPELINE), "n": n_captures, "fp": "ab" * 32,
             "detector": detector_fingerprint(PIPELINE)})
        chunk = conn.scalar(text(
            "INSERT INTO chunks (job_id, seq, state, n_items, attempts, deliveries, n_done, "
            "n_failed) VALUES (:job, 0, 'done', :n, 1, 1, :n, 0) RETURNING id"),
            {"job": job, "n": n_captures})
        conn.execute(text(
            "INSERT INTO job_captures (job_id, capture_id, chunk_id, state, attempts, finished_at) "
            "SELECT :job, id, :chunk, 'done', 1, now() FROM captures WHERE deployment_id = :dep"),
            {"job": job, "chunk": chunk, "dep": dep})
        conn.execute(text(
            "INSERT INTO detections (job_id, capture_id, x1, y1, x2, y2, score, label) "
            "SELECT :job, c.id, 100 + 150 * k, 200 + 100 * k, 180 + 150 * k, 300 + 100 * k, "
            "0.5 + k / 50.0, 'insect' FROM captures c, generate_series(0, :per - 1) AS k "
            "WHERE c.deployment_id = :dep"),
            {"job": job, "dep": dep, "per": DETECTIONS_PER_CAPTURE})
        conn.execute(text(
            "INSERT INTO classifications (detection_id, classifier, label, score, topk) "
            "SELECT d.id, 'bench_species', (CAST(:labels AS text[]))[1 + d.id % 4], 0.9, "
            "json_build_array(json_build_array((CAST(:labels AS text[]))[1 + d.id % 4], 0.9), "
            "json_build_array((CAST(:labels AS text[]))[1 + (d.id + 1) % 4], 0.05)) "
            "FROM detections d WHERE d.job_id = :job"), {"job": job, "labels": LABELS})
    with engine.begin() as conn:
        conn.execute(text("ANALYZE"))
    return int(job)


def peak_export(url: str, job: int, fmt: str, out_dir: Path) -> tuple[float, float, int]:
    """(seconds, peak RSS MiB, bytes written) of one `trapq export` run."""
    out = out_dir / (f"job{job}-{fmt}" + ("" if fmt == "camtrapdp" else f".{fmt}"))
    argv = [str(TRAPQ), "export", str(job), "--format", fmt, "-o", str(out)]
    if fmt == "camtrapdp":
        argv += CAMTRAP_OPTIONS
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAPQ_")}
    env.update(TRAPQ_DATABASE_URL=url, TRAPQ_DATA_DIR=str(out_dir), OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        assert proc.stderr is not None
        raise SystemExit(f"export {fmt} failed: {proc.stderr.read().decode()}")
    size = (sum(p.stat().st_size for p in out.iterdir()) if out.is_dir()
            else out.stat().st_size)
    return seconds, usage.ru_maxrss / 1024, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="detections of the big job")
    ap.add_argument("--small", type=int, default=10_000, help="detections of the small job")
    ap.add_argument("--formats", default=",".join(FORMATS))
    args = ap.parse_args()
    formats = [f for f in args.formats.split(",") if f]
    with temporary_database("trapq_bench_export") as url, tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(url)
        t0 = time.perf_counter()
        small = make_job(engine, "small", args.small)
        big = make_job(engine, "big", args.n)
        print(f"rows made in {time.perf_counter() - t0:.1f} s: {args.small} and {args.n} "
              f"detections ({DETECTIONS_PER_CAPTURE} per capture)")
        engine.dispose()
        print(f"{'format':<13}{'peak MiB small':>15}{'peak MiB big':>14}{'growth MiB':>12}"
              f"{'big s':>8}{'rows/s':>10}{'MiB out':>9}")
        result = []
        for fmt in formats:
            _, small_mib, _ = peak_export(url, small, fmt, Path(tmp))
            seconds, big_mib, size = peak_export(url, big, fmt, Path(tmp))
            print(f"{fmt:<13}{small_mib:>15.0f}{big_mib:>14.0f}{big_mib - small_mib:>12.0f}"
                  f"{seconds:>8.1f}{args.n / seconds:>10.0f}{size / 2**20:>9.0f}", flush=True)
            growth = big_mib - small_mib
            result.append(f"{fmt}_peak_mib={big_mib:.0f} {fmt}_growth_mib={growth:.0f}")
    print(f"RESULT rows={args.n} " + " ".join(result))


if __name__ == "__main__":
    main()
