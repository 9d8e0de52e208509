"""Database writes alone: db.results.write_results against a raw COPY of the same rows.

Two jobs over the same captures, written batch by batch in turn (so both see the same table
sizes): one through write_results as a chunk's delivery calls it (claim token checked, work
items locked, results replaced, items marked done, sizes recorded), one
as a bare COPY of the same detection and classification rows into the same tables in one
transaction per batch, with ids reserved up front. Their ratio is how close the exactly-once
write path comes to the fastest way into PostgreSQL. Each statement write_results sends is
timed by kind, its COPY is taken to cost what the raw phase's did, and what is left is
building the rows in Python and the commit.

bench.worker runs this as its database-only phase; on its own:

    .venv/bin/python -m bench.writes [--captures 2000] [--batch 128]
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # `python bench/writes.py` runs as `python -m bench.writes` would
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, event, text

from db.imports import get_or_create_deployment, insert_captures
from db.results import claim_chunk, pending_items, write_results
from db.session import make_engine, make_sessionmaker
from inference.types import Classification, Detection, ItemResult
from tests.services import temporary_database
from tests.worker_jobs import plan_job

BOXES = 20
TOP_K = 5
CLASSIFIER = "bench_classifier"


@dataclass(frozen=True)
class WriteFigures:
    captures: int
    detections: int  # rows per phase; as many classification rows
    write_s: float
    copy_s: float
    steps: dict[str, float]  # seconds write_results spent per step, over the whole run

    @property
    def write_rows_per_s(self) -> float:
        return 2 * self.detections / self.write_s

    @property
    def copy_rows_per_s(self) -> float:
        return 2 * self.detections / self.copy_s

    @property
    def ratio(self) -> float:
        return self.copy_s / self.write_s


def detections(boxes: int = BOXES, top_k: int = TOP_K) -> list[Detection]:
    """What one capture of the worker benchmark writes: `boxes` boxes, each with a top-k."""
    topk = [(f"kind{k}", round(0.9 / (k + 1), 4)) for k in range(top_k)]
    return [
        Detection(i, i, i + 10, i + 10, 0.9, "insect",
                  [Classification(CLASSIFIER, topk[0][0], topk[0][1], topk)])
        for i in range(boxes)
    ]


def bench_writes(engine: Engine, uris: list[str], batch: int) -> WriteFigures:
    """Write `uris` as captures with write_results and with a raw COPY, batch by batch."""
    factory = make_sessionmaker(engine)
    with factory.begin() as s:
        dep = get_or_create_deployment(s, "writes-only")
        insert_captures(s, dep, [
            {"uri": u, "captured_at": None, "width": None, "height": None} for u in uris
        ])
        via_results = plan_job(s, dep, chunk_size=batch)
        via_copy = plan_job(s, dep, chunk_size=batch)
    dets = detections()
    n_rows = len(uris) * len(dets)
    first_id = _reserve_detection_ids(engine, n_rows)
    write_s = copy_s = 0.0
    steps: dict[str, float] = defaultdict(float)
    n_det = 0
    for chunk_results, chunk_copy in zip(via_results.chunk_ids, via_copy.chunk_ids, strict=True):
        with factory.begin() as s:
            claim = claim_chunk(s, chunk_results, worker="bench", retries=0, max_deliveries=5)
            results = [ItemResult(i.capture_id, i.uri, 256, 192, dets)
                       for i in pending_items(s, chunk_results)]
            keys = [i.capture_id for i in pending_items(s, chunk_copy)]
        with _timed_statements(engine, steps):
            t0 = time.perf_counter()
            with factory.begin() as s:
                n_det += write_results(s, via_results.job_id, results, claim.token).detections
            write_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        first_id = _raw_copy(engine, via_copy.job_id, keys, dets, first_id)
        copy_s += time.perf_counter() - t0
    assert n_det == n_rows, (n_det, n_rows)
    steps["COPY of the rows (as the raw phase)"] = copy_s
    steps["Python and commit (the rest)"] = write_s - sum(steps.values())
    return WriteFigures(len(uris), n_rows, write_s, copy_s, dict(steps))


def print_figures(f: WriteFigures, label: str = "(b)") -> None:
    print(f"{label} write_results:      {f.captures / f.write_s:8.0f} captures/s "
          f"({f.write_rows_per_s:.0f} rows/s: {f.detections} detection "
          f"+ {f.detections} classification rows)", flush=True)
    print(f"    raw COPY, same rows:{f.captures / f.copy_s:8.0f} captures/s "
          f"({f.copy_rows_per_s:.0f} rows/s)", flush=True)
    print(f"    write_results / raw COPY: {f.ratio:.2f}", flush=True)
    for step, seconds in sorted(f.steps.items(), key=lambda kv: -kv[1]):
        print(f"      {step:34s} {1e6 * seconds / f.captures:7.1f} µs/capture "
              f"({100 * seconds / f.write_s:4.1f} %)", flush=True)


def _reserve_detection_ids(engine: Engine, n: int) -> int:
    """Move the detections sequence past n ids the raw COPY then uses; returns the first."""
    with engine.begin() as conn:
        last = conn.execute(text(
            "SELECT setval(pg_get_serial_sequence('detections', 'id'), "
            "nextval(pg_get_serial_sequence('detections', 'id')) + :n)"
        ), {"n": n}).scalar_one()
    return int(last) - n


def _raw_copy(
    engine: Engine, job_id: int, keys: list[int], dets: list[Detection], next_id: int
) -> int:
    """COPY the rows of `keys` x `dets` in one transaction, nothing else; returns the next id."""
    with engine.begin() as conn:
        driver: Any = conn.connection.driver_connection
        with driver.cursor() as cur:
            with cur.copy("COPY detections (id, job_id, capture_id, x1, y1, x2, y2, score, label)"
                          " FROM STDIN") as copy:
                det_id = next_id
                for key in keys:
                    for d in dets:
                        copy.write_row((det_id, job_id, key, d.x1, d.y1, d.x2, d.y2, d.score,
                                        d.label))
                        det_id += 1
            with cur.copy("COPY classifications (detection_id, classifier, label, score, topk)"
                          " FROM STDIN") as copy:
                det_id = next_id
                for _ in keys:
                    for d in dets:
                        c = d.classifications[0]
                        copy.write_row((det_id, c.classifier, c.label, c.score,
                                        json.dumps(c.topk)))
                        det_id += 1
    return det_id


@contextmanager
def _timed_statements(engine: Engine, steps: dict[str, float]) -> Iterator[None]:
    """Add each statement's time to `steps`, under the kind of statement it is."""
    started: list[float] = []

    def before(*_: Any) -> None:
        started.append(time.perf_counter())

    def after(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        steps[_step_of(statement)] += time.perf_counter() - started.pop()

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)


def _step_of(statement: str) -> str:
    s = " ".join(statement.split()).lower()
    if "nextval" in s:
        return "draw detection ids (nextval)"
    if s.startswith("delete"):
        return "delete old detections"
    if s.startswith("update captures"):
        return "record capture sizes"
    if s.startswith("update job_captures"):
        return "mark work items done/failed"
    if "from job_captures" in s and "for update" in s:
        return "lock the pending work items"
    if "from chunks" in s and "claim" in s:
        return "check the claim token"
    if s.startswith("set local"):
        return "limit idle time (SET LOCAL)"
    return "other statements"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captures", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    with temporary_database("trapq_bench_writes") as url:
        engine = make_engine(url)
        try:
            figures = bench_writes(
                engine, [f"/bench/img{i:06d}.jpg" for i in range(args.captures)], args.batch
            )
        finally:
            engine.dispose()
    print_figures(figures)
    print(f"RESULT write_rows_per_s={figures.write_rows_per_s:.0f} "
          f"copy_rows_per_s={figures.copy_rows_per_s:.0f} write_vs_copy={figures.ratio:.2f}")


if __name__ == "__main__":
    main()
