"""What storing embeddings costs: TRAPQ_STORE_EMBEDDINGS off against on, side by side.

  (a) the forward: the demo pipeline on rendered captures, embeddings off and on (the
      classifier's penultimate features caught in the same forward, copied back with the
      results), images/s;
  (b) the write path on PostgreSQL: db.results.write_results of the same captures x 20
      detections without and with a 128-wide float16 embedding each (the demo classifier's
      width), alternating batch by batch, captures/s and the table's bytes per detection.

    .venv/bin/python -m bench.embeddings [--images 16] [--captures 2000] [--batch 128]

Environment: TRAPQ_TEST_PG_URL, as the tests use.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # `python bench/embeddings.py` runs as `python -m bench.embeddings` would
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import time
from dataclasses import replace

import numpy as np
import torch
from sqlalchemy import Engine, text

from bench.writes import detections
from db.imports import get_or_create_deployment, insert_captures
from db.results import claim_chunk, pending_items, write_results
from db.session import make_engine, make_sessionmaker
from inference.forward import BatchForward, ForwardOptions
from inference.types import ItemResult
from synthetic.nights import plan_night
from synthetic.scenes import render_placements
from tasks.settings import Settings
from tasks.worker.boot import load_models
from tests.services import temporary_database
from tests.worker_jobs import plan_job

WIDTH = 128  # the demo classifier's penultimate features


def bench_forward(n_images: int, rounds: int = 2) -> dict[str, float]:
    """images/s of one BatchForward per setting over the same rendered captures."""
    size = (1920, 1080)
    images = []
    for cap in plan_night(11, n_images, size):
        image, _ = render_placements((11, cap.index), size, cap.placements, 11)
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous())
    pipeline = load_models(Settings(_env_file=None, device="cpu"))  # type: ignore[call-arg]
    out: dict[str, float] = {}
    per_setting = {
        "off": BatchForward(pipeline, ForwardOptions(embeddings=False)),
        "on": BatchForward(pipeline, ForwardOptions(embeddings=True)),
    }
    seconds = dict.fromkeys(per_setting, 0.0)
    for _ in range(rounds):
        for name, forward in per_setting.items():  # alternating, so both see the same machine
            t0 = time.perf_counter()
            for i in range(0, len(images), 4):
                forward(images[i : i + 4])
            seconds[name] += time.perf_counter() - t0
    for name, s in seconds.items():
        out[name] = rounds * len(images) / s
    return out


def bench_writes(engine: Engine, n: int, batch: int) -> dict[str, float]:
    """captures/s and bytes per detection of write_results, embeddings off and on."""
    factory = make_sessionmaker(engine)
    with factory.begin() as s:
        dep = get_or_create_deployment(s, "embedding-cost")
        insert_captures(s, dep, [
            {"uri": f"/bench/img{i:06d}.jpg", "captured_at": None, "width": None,
             "height": None} for i in range(n)
        ])
        jobs = {name: plan_job(s, dep, chunk_size=batch) for name in ("off", "on")}
    plain = detections()
    rng = np.random.default_rng(0)
    embedded = [replace(d, embedding=rng.normal(size=WIDTH).astype(np.float16).tobytes())
                for d in plain]
    dets = {"off": plain, "on": embedded}
    seconds = dict.fromkeys(jobs, 0.0)
    sizes = dict.fromkeys(jobs, 0)
    for turn, chunks in enumerate(zip(*(j.chunk_ids for j in jobs.values()), strict=True)):
        pairs = list(zip(jobs.items(), chunks, strict=True))
        for (name, job), chunk in pairs[:: 1 if turn % 2 else -1]:  # who goes first alternates
            with factory.begin() as s:
                claim_chunk(s, chunk, worker="bench", retries=0, max_deliveries=5)
                results = [ItemResult(i.capture_id, i.uri, 256, 192, dets[name])
                           for i in pending_items(s, chunk)]
            before = _detections_bytes(engine)
            t0 = time.perf_counter()
            with factory.begin() as s:
                write_results(s, job.job_id, results)
            seconds[name] += time.perf_counter() - t0
            sizes[name] += _detections_bytes(engine) - before
    rows = n * len(plain)
    return {**{f"{k}_captures_per_s": n / v for k, v in seconds.items()},
            **{f"{k}_bytes_per_detection": v / rows for k, v in sizes.items()}}


def _detections_bytes(engine: Engine) -> int:
    """The detections table with its TOAST and indexes, as PostgreSQL has it on disk."""
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_total_relation_size('detections')")).scalar_one())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--captures", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fwd = bench_forward(args.images)
    print(f"(a) forward, demo pipeline on CPU, {args.images} rendered 1920x1080 captures: "
          f"embeddings off {fwd['off']:.2f} images/s, on {fwd['on']:.2f} images/s "
          f"(on/off {fwd['on'] / fwd['off']:.3f})", flush=True)
    with temporary_database("trapq_bench_embeddings") as url:
        engine = make_engine(url)
        try:
            w = bench_writes(engine, args.captures, args.batch)
        finally:
            engine.dispose()
    print(f"(b) write_results, {args.captures} captures x 20 detections on PostgreSQL: "
          f"off {w['off_captures_per_s']:.0f} captures/s, {w['off_bytes_per_detection']:.0f} "
          f"bytes/detection; on {w['on_captures_per_s']:.0f} captures/s, "
          f"{w['on_bytes_per_detection']:.0f} bytes/detection", flush=True)
    print(f"RESULT forward_on_over_off={fwd['on'] / fwd['off']:.3f} "
          f"write_on_over_off={w['on_captures_per_s'] / w['off_captures_per_s']:.3f} "
          f"bytes_per_detection_off={w['off_bytes_per_detection']:.0f} "
          f"bytes_per_detection_on={w['on_bytes_per_detection']:.0f}")


if __name__ == "__main__":
    main()
