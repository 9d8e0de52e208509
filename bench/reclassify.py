"""Re-classification beside a full run, on the same captures, models and engine, in one run.

(a) full: fetch, decode, detector forward, crops, classifier; (b) re-classification: the same
images fetched and decoded, the boxes (a)'s, the detector skipped, crops and classifier only,
as a `trapq enqueue --reuse-detections-from JOB` job's workers run it. Prints wall time and
the engine's device-thread time of each, their ratios, and checks that (b) gave every box the
label (a) gave it (same classifier).

    python -m bench.reclassify --n 8
    python -m bench.reclassify --images /work/shared/data/moth-trap-captures --n 8
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # `python bench/reclassify.py` runs as `python -m bench.reclassify` would
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import tempfile
import time
from dataclasses import dataclass

import torch

from inference.engine import Engine, EngineConfig
from inference.registry import load_pipeline, model_source
from inference.types import Detection, ItemResult, WorkItem
from tasks.demo.scenes import generate_night

SUFFIXES = {".jpg", ".jpeg", ".png"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=Path, help="folder of captures (default: a demo night)")
    p.add_argument("--n", type=int, default=8, help="captures")
    p.add_argument("--size", default="1920x1080", help="demo night's capture size, WxH")
    p.add_argument("--device", default="auto")
    p.add_argument("--detector", default="demo_detector")
    p.add_argument("--classifier", default="demo_classifier")
    p.add_argument("--box-threshold", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--decode-threads", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=1, help="repeat both measurements")
    return p.parse_args()


@dataclass(frozen=True)
class Measured:
    wall_s: float
    device_s: float  # the engine thread's busy time: forwards, crops, classifiers
    results: list[ItemResult]

    @property
    def boxes(self) -> int:
        return sum(len(r.detections) for r in self.results)


def captures(args: argparse.Namespace, scratch: Path) -> list[Path]:
    if args.images is not None:
        found = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in SUFFIXES)
        if not found:
            raise SystemExit(f"no images under {args.images}")
        return (found * (1 + args.n // len(found)))[: args.n]
    w, h = (int(v) for v in args.size.split("x"))
    generate_night(scratch, n=args.n, seed=4242, size=(w, h))
    return sorted(scratch.glob("*.jpg"))


def measure(engine: Engine, items: list[WorkItem]) -> Measured:
    busy_before = engine.stats().busy_s
    t0 = time.perf_counter()
    results = list(engine.run(items))
    wall = time.perf_counter() - t0
    failed = [r for r in results if not r.ok]
    if failed:
        raise SystemExit(f"{len(failed)} captures failed, e.g. {failed[0].uri}: {failed[0].error}")
    busy = engine.stats().busy_s - busy_before
    return Measured(wall, busy, sorted(results, key=lambda r: r.key))


def with_boxes(full: Measured) -> list[WorkItem]:
    """The work items of a re-classification job: each capture with the full run's boxes."""
    items = []
    for r in full.results:
        given = tuple(
            Detection(d.x1, d.y1, d.x2, d.y2, d.score, d.label, source=r.key * 10_000 + i)
            for i, d in enumerate(r.detections)
        )
        items.append(WorkItem(r.key, r.uri, given))
    return items


def same_labels(full: Measured, again: Measured) -> float:
    pairs = [
        (a.classifications[-1].label, b.classifications[-1].label)
        for ra, rb in zip(full.results, again.results, strict=True)
        for a, b in zip(ra.detections, rb.detections, strict=True)
        if a.classifications and b.classifications
    ]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else 1.0


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipeline = load_pipeline(
        model_source(args.detector, "detector"),
        model_source(args.classifier, "classifier"),
        device=args.device,
        box_threshold=args.box_threshold,
    )
    config = EngineConfig(batch_size=args.batch_size, decode_threads=args.decode_threads)
    with tempfile.TemporaryDirectory() as tmp, Engine(pipeline, config) as engine:
        paths = captures(args, Path(tmp))
        plain = [WorkItem(i, str(p)) for i, p in enumerate(paths)]
        measure(engine, plain[:1])  # warm-up: first forwards allocate and pick kernels
        fulls, agains = [], []
        for _ in range(args.rounds):
            full = measure(engine, plain)
            fulls.append(full)
            agains.append(measure(engine, with_boxes(full)))
        full = min(fulls, key=lambda m: m.wall_s)
        again = min(agains, key=lambda m: m.wall_s)
    n = len(paths)
    agreement = same_labels(full, again)
    print(f"{n} captures, {full.boxes} boxes ({full.boxes / n:.1f} per capture), "
          f"{args.detector} + {args.classifier} on {pipeline.device}, best of {args.rounds}")
    print(f"{'run':<18}{'wall s':>9}{'img/s':>9}{'device s':>10}")
    for name, m in (("full", full), ("re-classification", again)):
        print(f"{name:<18}{m.wall_s:>9.2f}{n / m.wall_s:>9.2f}{m.device_s:>10.2f}")
    speedup = full.wall_s / again.wall_s
    device_speedup = full.device_s / again.device_s if again.device_s else float("inf")
    print(f"re-classification is {speedup:.1f}x faster end to end ({device_speedup:.1f}x on the "
          f"device thread); same top-1 label for {agreement:.1%} of the boxes")
    print(f"RESULT speedup={speedup:.2f} device_speedup={device_speedup:.2f} "
          f"full_s={full.wall_s:.2f} reclassify_s={again.wall_s:.2f} captures={n} "
          f"boxes={full.boxes} same_label={agreement:.3f}")


if __name__ == "__main__":
    main()
