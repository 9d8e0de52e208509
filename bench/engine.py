"""Engine throughput beside its ceiling and two baselines, on the same files and models, in one run.

(a) model-only ceiling: frames already decoded and resident on the device, best batch size;
(b) the engine end to end from files; (c) a naive loop: one image at a time, PIL crop and one
classifier call per detection; (d) a DataLoader baseline: workers and pinned memory for the
detection batches, per-crop PIL transforms stacked for one classifier call per batch.
All four use the same models and the engine's precision policy (the detector's backbone in
reduced precision, its heads, box decoding and NMS in float32; the classifier in reduced
precision). The random detector gets the real number of classes (moth + background, not COCO's
91, which made the postprocess run per-class NMS ~90 times per image) and a score threshold
calibrated to keep ~--boxes detections per image.

    python -m bench.engine --images /work/shared/data/moth-trap-captures --n 8
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # `python bench/engine.py` runs as `python -m bench.engine` would
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import contextlib
import os
import resource
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

from inference.crops import normalize
from inference.engine import Engine, EngineConfig
from inference.fetch import FetchPolicy
from inference.forward import DTYPES, BatchForward, ForwardOptions
from inference.registry import Pipeline, load_pipeline, model_source
from inference.types import EngineStats, WorkItem

T = TypeVar("T")
SUFFIXES = {".jpg", ".jpeg", ".png"}
MIN_PIXELS = 1920 * 1080


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--images", type=Path, help="folder of captures (default: generated 1080p JPEGs)"
    )
    p.add_argument("--n", type=int, default=8, help="images per measurement")
    p.add_argument("--device", default="auto")
    p.add_argument("--detector", default="fasterrcnn_mobilenet_v3_large_320_fpn")
    p.add_argument("--classifier", default="resnet50")
    p.add_argument("--boxes", type=int, default=20, help="detections per image sent to classify")
    p.add_argument("--classes", type=int, default=2, help="detector classes, background included")
    p.add_argument(
        "--batch-sizes", default="", help="ceiling sweep, e.g. 1,2,4 (default by device)"
    )
    p.add_argument("--crop-batch-size", type=int, default=256)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--decode-threads", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the four measurements")
    p.add_argument(
        "--naive-n", type=int, default=2, help="images for the (slow) naive loop; 0: all --n"
    )
    return p.parse_args()


def generated_captures(folder: Path, n: int) -> list[Path]:
    """1920x1080 frames with a lit-sheet gradient and dark 'insects', so JPEGs cost what real
    captures cost to decode."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        y, x = np.mgrid[0:1080, 0:1920]
        base = np.stack([200 - y // 20, 190 - x // 40, 170 + (x + y) // 80], -1)
        noise = rng.integers(0, 12, (1080, 1920, 3))
        im = Image.fromarray((base + noise).clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(30):
            cx, cy = int(rng.integers(50, 1870)), int(rng.integers(50, 1030))
            rx, ry = int(rng.integers(15, 90)), int(rng.integers(10, 60))
            color = tuple(int(c) for c in rng.integers(20, 120, 3))
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=color)
        path = folder / f"capture_{i:04d}.jpg"
        im.save(path, "JPEG", quality=92)
        paths.append(path)
    return paths


def listed_captures(folder: Path, n: int) -> list[Path]:
    """n files spread over the folder's sorted listing (so every site is represented), 1080p or
    larger only; cycled when the folder holds fewer."""
    found = []
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in SUFFIXES:
            with Image.open(p) as im:
                if im.width * im.height >= MIN_PIXELS:
                    found.append(p)
    if not found:
        raise SystemExit(f"no .jpg/.jpeg/.png files of 1920x1080 or more under {folder}")
    step = max(1, len(found) // n)
    return [found[(i * step) % len(found)] for i in range(n)]


def _size(path: Path) -> str:
    with Image.open(path) as im:
        return f"{im.width}x{im.height}"


def build(args: argparse.Namespace, classifier_size: int = 0) -> Pipeline:
    """Random weights; a Faster R-CNN head with args.classes classes. Call calibrate() on
    frames before measuring, for ~args.boxes detections per image."""
    torch.manual_seed(0)
    kwargs = {"boxes": args.boxes} if args.detector == "constant_boxes" else {}
    size = (classifier_size, classifier_size) if classifier_size else None
    pipeline = load_pipeline(
        model_source(args.detector, "detector", random_weights=True),
        model_source(args.classifier, "classifier", random_weights=True, input_size=size),
        device=args.device,
        box_threshold=0.0,
        precision=args.precision,
        detector_kwargs=kwargs,
    )
    real_head(pipeline, args.classes)
    return pipeline


def real_head(pipeline: Pipeline, classes: int) -> None:
    """A Faster R-CNN box predictor for `classes` classes (background included), seeded, its
    class weights spread so that scores range as a trained head's do (a default-initialised
    one on random features gives every box ~0.5, and no threshold picks ~20 of them)."""
    roi_heads = getattr(pipeline.detector.module, "roi_heads", None)
    if roi_heads is None:
        return
    torch.manual_seed(0)
    in_features = roi_heads.box_predictor.cls_score.in_features
    predictor = FastRCNNPredictor(in_features, classes)
    with torch.no_grad():
        predictor.cls_score.weight.normal_(0, 0.5)
    roi_heads.box_predictor = predictor.to(pipeline.device)
    pipeline.detector.num_classes = classes


def policy_detector(pipeline: Pipeline) -> Callable[[list[torch.Tensor]], list[dict]]:
    """The detector as the engine runs it (inference.forward): BatchForward wraps its backbone
    for reduced precision; heads, box decoding and NMS run in float32, autocast off."""
    module = BatchForward(pipeline, ForwardOptions()).detector

    def run(inputs: list[torch.Tensor]) -> list[dict]:
        with torch.autocast(pipeline.device.type, enabled=False):
            return module(inputs)

    return run


def calibrate(pipeline: Pipeline, frames: list[torch.Tensor], boxes: int) -> float:
    """Sets the score threshold at which the detector keeps ~`boxes` detections per image on
    these frames (the median over them, as the engine's forward resizes and runs them), in the
    model and the pipeline; returns it."""
    model = pipeline.detector.module
    holder = getattr(model, "roi_heads", model)
    if not hasattr(holder, "score_thresh"):
        return pipeline.box_threshold
    holder.score_thresh = pipeline.box_threshold = 0.0
    holder.detections_per_img = max(4 * boxes, 100)
    forward = BatchForward(pipeline, ForwardOptions())
    kth = []
    for frame in frames:
        scores = sorted((d.score for d in forward([frame])[0]), reverse=True)
        kth.append(scores[min(boxes, len(scores)) - 1] if scores else 0.0)
    # Just under the median k-th score, and at most `boxes` kept: a random head scores many
    # boxes alike, and a threshold at such a tie would keep a handful or hundreds.
    threshold = max(0.0, statistics.median(kth) - 1e-6)
    holder.score_thresh = pipeline.box_threshold = threshold
    holder.detections_per_img = boxes
    return threshold


def in_thread(fn: Callable[[], T]) -> T:
    """Every figure is measured in a fresh thread, as the engine's forward runs in its own:
    on a loaded CPU, torch's intra-op threads behave differently in the main thread (2 threads
    there ran resnet50 up to 2x slower than in a second thread), which is no fair comparison."""
    out: list[T] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    if not out:
        raise SystemExit("a measurement failed; see the traceback above")
    return out[0]


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the DataLoader's workers): on a
    shared machine it varies less with the neighbours' load than wall time does."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(pipeline: Pipeline) -> contextlib.AbstractContextManager[object]:
    dtype = DTYPES[pipeline.precision]
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(pipeline.device.type, dtype=dtype)


def batches(items: list[torch.Tensor], size: int) -> Iterator[list[torch.Tensor]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def resident_frames(pipeline: Pipeline, paths: list[Path]) -> list[torch.Tensor]:
    return [
        decode_image(str(p), mode=ImageReadMode.RGB, apply_exif_orientation=True).to(
            pipeline.device
        )
        for p in paths
    ]


def ceiling(forward: BatchForward, frames: list[torch.Tensor], size: int) -> tuple[float, float]:
    """Images/s and boxes/image of the forward alone, over frames decoded beforehand and
    resident on the device."""
    device = forward.device
    sync(device)
    t0 = time.perf_counter()
    found = sum(len(d) for batch in batches(frames, size) for d in forward(batch))
    sync(device)
    return len(frames) / (time.perf_counter() - t0), found / len(frames)


def engine_e2e(
    pipeline: Pipeline, paths: list[Path], config: EngineConfig
) -> tuple[float, EngineStats]:
    with Engine(pipeline, config) as engine:
        if pipeline.device.type == "cuda":
            list(engine.run([WorkItem(0, str(paths[0]))]))
        t0 = time.perf_counter()
        results = list(engine.run(WorkItem(i, str(p)) for i, p in enumerate(paths)))
        elapsed = time.perf_counter() - t0
        stats = engine.stats()
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise SystemExit(f"engine failed on {len(failed)} images, e.g. {failed[0]}")
    return len(paths) / elapsed, stats


def _classify(pipeline: Pipeline, crops: torch.Tensor) -> torch.Tensor:
    spec = pipeline.classifier.entry
    x = normalize(crops.to(pipeline.device, non_blocking=True) * 255.0, spec.mean, spec.std)
    with autocast(pipeline):
        logits = pipeline.classifier.module(x)
    return logits.float().softmax(1).topk(min(5, logits.shape[1]), dim=1).indices.cpu()


def _kept(out: dict[str, torch.Tensor], threshold: float) -> list[list[float]]:
    return out["boxes"][out["scores"] >= threshold].float().cpu().tolist()


def naive(pipeline: Pipeline, paths: list[Path]) -> float:
    """What a first script does: PIL decode, full frame to the detector, one call per crop."""
    size = pipeline.classifier.source.input_size
    detector = policy_detector(pipeline)

    def one(path: Path) -> None:
        im = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        x = TF.to_tensor(im).to(pipeline.device)
        out = detector([x])[0]
        for box in _kept(out, pipeline.box_threshold):
            crop = im.crop(tuple(box)).resize((size[1], size[0]), Image.BILINEAR)
            _classify(pipeline, TF.to_tensor(crop).unsqueeze(0))

    with torch.inference_mode():
        if pipeline.device.type == "cuda":
            one(paths[0])
        sync(pipeline.device)
        t0 = time.perf_counter()
        for path in paths:
            one(path)
        sync(pipeline.device)
    return len(paths) / (time.perf_counter() - t0)


class _Files(Dataset):
    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return decode_image(str(self.paths[i]), mode=ImageReadMode.RGB, apply_exif_orientation=True)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def dataloader(pipeline: Pipeline, paths: list[Path], batch: int, workers: int) -> float:
    """The usual tuned script: DataLoader workers decode, pinned batches go to the detector, and
    each crop is cut with PIL and transformed alone before one stacked classifier call."""
    size = pipeline.classifier.source.input_size
    detector = policy_detector(pipeline)
    cuda = pipeline.device.type == "cuda"
    loader = DataLoader(
        _Files(paths),
        batch_size=batch,
        num_workers=workers,
        pin_memory=cuda,
        collate_fn=list,
        worker_init_fn=_one_thread,
        persistent_workers=False,
    )
    with torch.inference_mode():
        t0 = time.perf_counter()
        for frames in loader:
            inputs = [f.to(pipeline.device, non_blocking=True).float() / 255 for f in frames]
            outs = detector(inputs)
            crops = []
            for frame, out in zip(frames, outs, strict=True):
                pil = TF.to_pil_image(frame)
                for box in _kept(out, pipeline.box_threshold):
                    crop = pil.crop(tuple(box)).resize((size[1], size[0]), Image.BILINEAR)
                    crops.append(TF.to_tensor(crop))
            if crops:
                stacked = torch.stack(crops)
                _classify(pipeline, stacked.pin_memory() if cuda else stacked)
        sync(pipeline.device)
    return len(paths) / (time.perf_counter() - t0)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    pipeline = build(args)
    device = pipeline.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    sizes = [int(s) for s in args.batch_sizes.split(",") if s] or (
        [4, 8, 16, 32] if device.type == "cuda" else [1, 2]
    )
    with tempfile.TemporaryDirectory(prefix="trapq-bench-") as tmp:
        if args.images:
            paths = listed_captures(args.images, args.n)
            source = str(args.images)
        else:
            paths = generated_captures(Path(tmp), args.n)
            source = f"{args.n} generated 1920x1080 JPEGs"
        frame = ", ".join(sorted({_size(p) for p in paths}))
        print(
            f"device={device} ({name}) torch_threads={torch.get_num_threads()} "
            f"precision={pipeline.precision} images={source} ({frame}) n={len(paths)}"
        )
        print(f"detector={args.detector} classifier={args.classifier} (random weights)")
        frames = resident_frames(pipeline, paths)
        threshold = calibrate(pipeline, frames[:4], args.boxes)
        print(f"score threshold {threshold:.4f} for ~{args.boxes} boxes/image, "
              f"{args.classes} detector classes")
        forward = BatchForward(pipeline, ForwardOptions(args.crop_batch_size))
        forward(frames[:1])  # warms every model up for all four measurements
        swept = {
            size: in_thread(lambda size=size: ceiling(forward, frames, size)) for size in sizes
        }
        for size, (rate, _) in swept.items():
            print(f"    ceiling batch {size:>3}: {rate:7.3f} img/s")
        best = max(swept, key=lambda size: swept[size][0])
        boxes = swept[best][1]
        config = EngineConfig(
            fetch=FetchPolicy(pool_size=4),
            forward=ForwardOptions(args.crop_batch_size),
            batch_size=best,
            decode_threads=args.decode_threads,
            max_images_in_flight=max(2 * best, 8),
        )

        def run_ceiling() -> tuple[float, str]:
            rate, found = ceiling(forward, frames, best)
            return rate, f"batch {best}, {found:.1f} boxes/img"

        def run_engine() -> tuple[float, str]:
            rate, stats = engine_e2e(pipeline, paths, config)
            return rate, (
                f"mean batch {stats.mean_batch_size:.1f}, busy "
                f"{stats.gpu_busy_fraction:.2f}, decoded peak {stats.decoded_in_flight_peak}"
            )

        measures = {
            "ceiling": ("(a) model-only ceiling ", run_ceiling),
            "e2e": ("(b) engine end to end  ", run_engine),
            "naive": (
                "(c) naive loop         ",
                lambda: (naive(pipeline, paths[: args.naive_n or len(paths)]), ""),
            ),
            "dataloader": (
                "(d) DataLoader baseline",
                lambda: (dataloader(pipeline, paths, best, args.workers), ""),
            ),
        }
        figures: dict[str, list[float]] = {k: [] for k in measures}
        print(f"{boxes:.1f} boxes/image reach the classifier; best ceiling batch {best}")
        for r in range(args.rounds):
            # ABBA order: a load that drifts during the run weighs on every figure alike
            order = list(measures) if r % 2 == 0 else list(reversed(measures))
            print(f"round {r + 1}/{args.rounds}")
            for key in order:
                title, measure = measures[key]
                cpu0 = cpu_seconds()
                rate, note = in_thread(measure)
                count = (
                    min(len(paths), args.naive_n or len(paths)) if key == "naive" else len(paths)
                )
                cpu = (cpu_seconds() - cpu0) / count
                figures[key].append(rate)
                print(f"{title}: {rate:7.3f} img/s  {cpu:6.2f} CPU s/img  {note}")
    mean = {k: statistics.fmean(v) for k, v in figures.items()}
    over = {k: mean["e2e"] / mean[k] for k in ("ceiling", "naive", "dataloader")}
    print(
        f"images/s: ceiling {mean['ceiling']:.3f}  e2e {mean['e2e']:.3f}  "
        f"naive {mean['naive']:.3f}  dataloader {mean['dataloader']:.3f}  ({name})"
    )
    print(
        f"RESULT e2e_over_ceiling={over['ceiling']:.3f} e2e_over_naive={over['naive']:.3f} "
        f"e2e_over_dataloader={over['dataloader']:.3f} device={device.type}"
    )


if __name__ == "__main__":
    main()
