"""Many pipelines on one worker: the model cache and affinity routing, measured side by side.

One real worker (PostgreSQL + Redis, the demo classifier on CPU behind the zero-cost detector),
three pipelines whose classifiers differ (the same architecture, other weights), chunks sent so
that consecutive chunks alternate pipelines. Prints, in one run:

  (a) captures/s of the mixed workload with a cache that holds all three, against the same
      captures under one pipeline;
  (b) with a cache bound that holds two, loads per 100 chunks without and with affinity
      routing; chunks go out in waves, as a dispatcher with a shallow broker window sends them;
  model loads, evictions and hits, and the worker's peak RSS against the cache's bound.

    python -m bench.pipelines [--captures 96] [--chunk-size 4] [--wave 6]

Fresh temporary database and queue, removed afterwards.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # `python bench/pipelines.py` runs as `python -m bench.pipelines` would
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass

import torch
from sqlalchemy import Engine, func, select

from db.imports import get_or_create_deployment, insert_captures
from db.jobs import create_job
from db.models import Chunk
from db.session import make_engine, make_sessionmaker
from inference.model_cache import module_bytes
from inference.registry import REGISTRY, load_model, model_source
from tasks.pipeline import add_named_pipeline
from tasks.producer import send_chunks
from tasks.routing import forget_consumed
from tasks.settings import Settings
from tests.services import REDIS_URL, service_env, temporary_database, temporary_queue
from tests.worker_jobs import write_jpegs
from tests.worker_process import WorkerProcess

NAMES = ("north", "south", "east")


@dataclass(frozen=True)
class Run:
    seconds: float
    chunks: int
    captures: int
    loads: int
    evictions: int
    hits: int
    peak_rss_mb: float

    @property
    def captures_per_s(self) -> float:
        return self.captures / self.seconds

    @property
    def loads_per_100(self) -> float:
        return 100 * self.loads / self.chunks


def classifier_weights(folder: Path, winner: int) -> Path:
    source = Path(REGISTRY["demo_classifier"].default_weights or "")
    state = torch.load(source, map_location="cpu", weights_only=True)
    state["fc.bias"] = state["fc.bias"].clone()
    state["fc.bias"][winner % len(state["fc.bias"])] += 10.0 * (1 + winner)
    path = folder / f"classifier-{winner}.pt"
    torch.save(state, path)
    return path


def classifier_mib() -> float:
    source = model_source("demo_classifier", "classifier")
    return module_bytes(load_model(source, "classifier", torch.device("cpu")).module) / 2**20


class RssPeak(threading.Thread):
    def __init__(self, worker: WorkerProcess) -> None:
        super().__init__(daemon=True)
        self.worker, self.peak, self.stop = worker, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                self.peak = max(self.peak, self.worker.rss_mb())
            except Exception:
                return


def plan(engine: Engine, refs: list[tuple[int, str, dict]], chunk_size: int) -> list[int]:
    """One job per pipeline over the deployment's captures; chunk ids interleaved."""
    per_job: list[list[int]] = []
    with make_sessionmaker(engine).begin() as s:
        dep = get_or_create_deployment(s, "bench")
        for pid, fingerprint, spec in refs:
            job = create_job(s, dep, pipeline=spec, fingerprint=fingerprint, pipeline_id=pid,
                             chunk_size=chunk_size)
            per_job.append(job.chunk_ids)
    return [c for group in zip(*per_job, strict=True) for c in group]


def ended(engine: Engine, chunk_ids: list[int]) -> int:
    with make_sessionmaker(engine)() as s:
        return s.scalar(select(func.count()).select_from(Chunk).where(
            Chunk.id.in_(chunk_ids), Chunk.state.in_(("done", "failed")))) or 0


def run(engine: Engine, settings: Settings, env: dict[str, str], log: Path,
        refs: list[tuple[int, str, dict]], chunk_size: int, wave: int) -> Run:
    """One worker of `env` through one job per ref, `wave` chunks sent at a time."""
    worker = WorkerProcess(env, log, concurrency=2).start()
    sampler = RssPeak(worker)
    sampler.start()
    try:
        chunk_ids = plan(engine, refs, chunk_size)
        forget_consumed()
        t0 = time.perf_counter()
        for start in range(0, len(chunk_ids), wave):
            part = chunk_ids[start : start + wave]
            send_chunks(settings, make_sessionmaker(engine), part)
            while ended(engine, part) < len(part):
                assert worker.proc is not None and worker.proc.poll() is None, worker.tail()
                time.sleep(0.05)
            forget_consumed()
        seconds = time.perf_counter() - t0
        text = worker.log_text()
    finally:
        sampler.stop.set()
        worker.stop()
    # the worker's own start-up pipeline (its TRAPQ_* settings) is not one of the runs' loads
    loads = len(re.findall(r"loaded into the model cache", text)) - 1
    evictions = len(re.findall(r"evicted from the model cache", text))
    failed = len(chunk_ids) - ended(engine, chunk_ids)
    assert failed == 0
    return Run(seconds, len(chunk_ids), len(chunk_ids) * chunk_size, loads, evictions,
               len(chunk_ids) - loads, sampler.peak)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captures", type=int, default=96, help="captures per job")
    ap.add_argument("--chunk-size", type=int, default=4)
    ap.add_argument("--wave", type=int, default=6, help="chunks sent at a time")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, temporary_database("trapq_bench") as url, \
            temporary_queue("trapq-bench") as queue:
        folder = Path(tmp)
        env = service_env(folder / "data", url, REDIS_URL, queue,
                          TRAPQ_DETECTOR="constant_boxes", TRAPQ_CLASSIFIER="demo_classifier",
                          TRAPQ_RANDOM_WEIGHTS="true", TRAPQ_BATCH_SIZE="4",
                          TRAPQ_FETCH_THREADS="2", TRAPQ_DECODE_THREADS="1")
        settings = Settings(_env_file=None, database_url=url, broker_url=REDIS_URL,  # type: ignore[call-arg]
                            result_backend=REDIS_URL, queue=queue, data_dir=folder / "data",
                            detector="constant_boxes", classifier="demo_classifier")
        engine = make_engine(url)
        paths = write_jpegs(folder / "images", args.captures, 320, 240)
        with make_sessionmaker(engine).begin() as s:
            insert_captures(s, get_or_create_deployment(s, "bench"), [
                {"uri": str(p), "captured_at": None, "width": None, "height": None}
                for p in paths])
        refs = []
        for i, name in enumerate(NAMES):
            stored, _ = add_named_pipeline(
                settings, name, {"classifier_weights": str(classifier_weights(folder, i))}, "")
            refs.append((stored.id, stored.fingerprint, stored.spec))
        mib = classifier_mib()
        all_three, two = f"{4 * mib:.3f}", f"{2.5 * mib:.3f}"
        with_cache = {**env, "TRAPQ_MODEL_CACHE_MB": all_three}
        single = run(engine, settings, with_cache, folder / "single.log", [refs[0]] * 3,
                     args.chunk_size, 3 * args.wave)
        load1_single = os.getloadavg()[0]
        mixed = run(engine, settings, with_cache, folder / "mixed.log", refs, args.chunk_size,
                    3 * args.wave)
        load1_mixed = os.getloadavg()[0]
        small = {**env, "TRAPQ_MODEL_CACHE_MB": two}
        plain = run(engine, settings.model_copy(update={"affinity": False}),
                    {**small, "TRAPQ_AFFINITY": "false"}, folder / "plain.log", refs,
                    args.chunk_size, args.wave)
        load1_plain = os.getloadavg()[0]
        routed = run(engine, settings, small, folder / "routed.log", refs, args.chunk_size,
                     args.wave)
        load1_routed = os.getloadavg()[0]
        engine.dispose()
    ratio = mixed.captures_per_s / single.captures_per_s
    print(f"(a) one pipeline: {single.captures_per_s:.1f} captures/s (load1 {load1_single:.1f}); "
          f"three alternating: {mixed.captures_per_s:.1f} captures/s (load1 {load1_mixed:.1f}); "
          f"ratio {ratio:.2f} (goal >= 0.9); cache of {all_three} MiB: {mixed.loads} loads, "
          f"{mixed.evictions} evictions, {mixed.hits} hits")
    for label, r, load1 in (("without affinity", plain, load1_plain),
                            ("with affinity", routed, load1_routed)):
        print(f"(b) cache of {two} MiB (two of three), {label}: {r.loads} loads, "
              f"{r.evictions} evictions, {r.hits} hits over {r.chunks} chunks = "
              f"{r.loads_per_100:.1f} loads per 100 chunks; peak worker RSS "
              f"{r.peak_rss_mb:.0f} MiB (classifier {mib:.2f} MiB each) (load1 {load1:.1f})")
    print(f"RESULT mixed_vs_single={ratio:.2f} loads_per_100_plain={plain.loads_per_100:.1f} "
          f"loads_per_100_affinity={routed.loads_per_100:.1f} "
          f"peak_rss_mb={max(plain.peak_rss_mb, routed.peak_rss_mb):.0f} "
          f"load1={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
