"""Antenna's pull mode through trapq, side by side with the same captures enqueued directly.

One real worker (subprocess, threads pool) and a dispatcher on Redis and PostgreSQL run the
zero-cost `constant_boxes` detector (20 boxes per image) and a 29,176-label classifier head
(a TorchScript head of constant logits, the size of a global moth species list), so what is
measured is trapq's own path, not a model. In one run:

  (a) direct: N images as captures of a deployment, one job planned as `trapq enqueue`
      plans it, released by the dispatcher; captures/s from planning to the job's end;
  (b) Antenna: N other images of the same size (nothing is answered from SQL) as one
      Antenna job in the mock Antenna (tests.antenna_mock, real HTTP), served by `trapq
      antenna`; captures/s from the first task handed out to the last answer accepted, and
      each task's latency from its delivery to its answer, against the ack wait;
  (c) the largest result POST and the registration POST, whose category map carries the
      29,176 labels once; each classification carries its top-5 scores at their positions
      in that map, zeros elsewhere written `0` (Antenna reads scores by position).

    .venv/bin/python -m bench.antenna [--images 200] [--ack-wait 60] [--chunk-size 16]

Goals (issue #25): p95 latency <= half the ack wait, (b)/(a) >= 0.9, every POST <= 8 MiB.
Environment: TRAPQ_TEST_PG_URL and TRAPQ_TEST_REDIS_URL, as the tests use.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # `python bench/antenna.py` runs as `python -m bench.antenna` would
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import os
import statistics
import tempfile
import time

import psutil
import torch

from db.session import make_engine
from tests.antenna_mock import AntennaMock, Images
from tests.local_http import serving
from tests.services import REDIS_URL, service_env, temporary_database, temporary_queue
from tests.trapq_cli import TRAPQ
from tests.worker_jobs import env_pipeline, job_state, make_job
from tests.worker_process import WorkerProcess, wait_for

LABELS = 29_176
TOP_K = 5
SLUG = "trapq-default-v1"


class ConstantHead(torch.nn.Module):
    """29,176 constant logits whatever the crop: a head whose cost is nil."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("logits", -torch.arange(n, dtype=torch.float32) / n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1) + x.mean() * 0


def write_head(folder: Path) -> tuple[Path, Path]:
    weights, labels = folder / "head.pt", folder / "labels.txt"
    torch.jit.script(ConstantHead(LABELS)).save(str(weights))
    labels.write_text("".join(f"Species {i:05d}\n" for i in range(LABELS)))
    return weights, labels


def load1() -> float:
    return os.getloadavg()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--ack-wait", type=float, default=60.0)
    parser.add_argument("--chunk-size", type=int, default=16)
    args = parser.parse_args()
    n = args.images

    with (tempfile.TemporaryDirectory() as tmp, temporary_database("trapq_bench") as db_url,
          temporary_queue("trapq-bench") as queue, serving(Images) as images):
        weights, labels = write_head(Path(tmp))
        env = service_env(
            Path(tmp) / "data", db_url, REDIS_URL, queue,
            TRAPQ_DETECTOR="constant_boxes", TRAPQ_CLASSIFIER="demo_classifier",
            TRAPQ_CLASSIFIER_WEIGHTS=str(weights), TRAPQ_CLASSIFIER_LABELS=str(labels),
            TRAPQ_TOP_K=str(TOP_K), TRAPQ_STORE_EMBEDDINGS="false", TRAPQ_HEARTBEAT_S="0.5",
            TRAPQ_TRACK_AFTER_JOB="false", MKL_NUM_THREADS="1",
        )
        engine = make_engine(db_url)
        worker = WorkerProcess(env, Path(tmp) / "worker.log").start()
        dispatcher = WorkerProcess(env, Path(tmp) / "dispatcher.log",
                                   argv=[sys.executable, "-m", "tasks.dispatcher"])
        dispatcher.start(ready="dispatching")
        try:
            # (a) direct
            t0 = time.monotonic()
            job = make_job(engine, [f"{images}/img/{i}.jpg" for i in range(n)],
                           chunk_size=args.chunk_size, deployment="bench-direct",
                           spec=env_pipeline(env))
            wait_for(lambda: job_state(engine, job.job_id) == "done", 1800, "direct job",
                     on_timeout=worker.tail)
            direct = n / (time.monotonic() - t0)
            direct_load = load1()
            print(f"(a) direct enqueue: {direct:.1f} captures/s  (load1 {direct_load:.2f})")

            # (b) Antenna
            mock = AntennaMock(ack_wait_s=args.ack_wait).start()
            antenna_job = mock.add_job(1, SLUG, [(str(i), f"{images}/img/{n + i}.jpg")
                                                 for i in range(n)])
            bridge_env = dict(env, TRAPQ_ANTENNA_URL=mock.url, TRAPQ_ANTENNA_TOKEN=mock.token,
                              TRAPQ_ANTENNA_PROJECTS="[1]",
                              TRAPQ_ANTENNA_ACK_WAIT_S=str(args.ack_wait),
                              TRAPQ_ANTENNA_POLL_S="0.3",
                              TRAPQ_ANTENNA_CHUNK_SIZE=str(args.chunk_size))
            bridge = WorkerProcess(bridge_env, Path(tmp) / "bridge.log",
                                   argv=[str(TRAPQ), "antenna"]).start(ready="registered ")
            started = psutil.Process(bridge.pid).cpu_times()
            try:
                wait_for(lambda: mock.finished(antenna_job), 1800, "Antenna job",
                         on_timeout=bridge.tail)
                cpu = psutil.Process(bridge.pid).cpu_times()
                bridge_cpu = cpu.user + cpu.system - started.user - started.system
            finally:
                bridge.stop()
                mock.stop()
            antenna_load = load1()
            tasks = mock.jobs[antenna_job].tasks
            first = min(t.first_delivered for t in tasks if t.first_delivered is not None)
            last = max(t.answered for t in tasks if t.answered is not None)
            through = n / (last - first)
            lat = sorted(mock.latencies())
            p50 = statistics.median(lat)
            p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
            print(f"(b) trapq antenna:  {through:.1f} captures/s, latency p50 {p50:.1f} s "
                  f"p95 {p95:.1f} s, ack wait {args.ack_wait:.0f} s; the bridge's own CPU "
                  f"{1000 * bridge_cpu / n:.1f} ms per capture once started, on the same "
                  f"cores as the worker  (load1 {antenna_load:.2f})")
            assert mock.problems == [], mock.problems
            assert all(len(a) == 1 for a in mock.answers(antenna_job).values())

            # (c) sizes
            results = mock.result_posts()
            largest = max(p.size for p in results)
            register = max(p.size for p in mock.posts if p.path.endswith("/pipelines/"))
            most_scores = max(
                len(c["scores"])
                for answers in mock.answers(antenna_job).values() for a in answers
                for d in a.get("detections", []) for c in d["classifications"]
            )
            print(f"(c) largest result POST {largest / 2**20:.3f} MiB over {len(results)} "
                  f"POSTs; registration {register / 2**20:.2f} MiB ({LABELS} labels once); "
                  f"scores per classification <= {most_scores}  (load1 {load1():.2f})")
        finally:
            dispatcher.stop()
            worker.stop()
            engine.dispose()

    ratio = through / direct
    print(f"captures/s antenna/direct {ratio:.2f} (goal >= 0.9); p95/ack wait "
          f"{p95 / args.ack_wait:.2f} (goal <= 0.5)")
    print(
        f"RESULT images={n} ack_wait_s={args.ack_wait:.0f} p50_s={p50:.2f} p95_s={p95:.2f} "
        f"p95_over_ack={p95 / args.ack_wait:.3f} antenna_cps={through:.2f} "
        f"direct_cps={direct:.2f} ratio={ratio:.3f} largest_post_mib={largest / 2**20:.3f} "
        f"register_post_mib={register / 2**20:.2f} max_scores={most_scores} "
        f"bridge_cpu_ms_per_capture={1000 * bridge_cpu / n:.1f} "
        f"load1={load1():.2f}"
    )


if __name__ == "__main__":
    main()
