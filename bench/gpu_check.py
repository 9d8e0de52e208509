"""The one-shot GPU check: run it once on a lent GPU and read its RESULT lines.

    PYTHONPATH=. python3 -m bench.gpu_check            # or: make gpu-check
    PYTHONPATH=. python3 -m bench.gpu_check --images captures/   # real captures, carried along

It imports only inference/, bench/ and the scene generator (numpy and Pillow), so it runs with a
bare image's python3, torch and torchvision (torch 2.11 / torchvision 0.26 were seen on the lent
H200s; the project pins 2.14.1 / 0.29.1). Without --images it makes its own inputs in /dev/shm:
synthetic 4096x2160 captures from synthetic/scenes.py, plus grey, CMYK, progressive,
truncated and EXIF-rotated variants. One RESULT line per check; the last line sums them up.

Correctness checks fail the run (exit 1): decode (nvJPEG routing, outcome per variant alone
and in a batch of 8 with one bad file, GPU-vs-CPU mean absolute difference), precision (every
registry detector's boxes float32 under bf16), oom (no image fails alone under a memory cap of
2.5x the batch-1 peak) and sticky (a device-side assert in a subprocess ends that process).
Measurements never fail it: throughput (engine end to end against the model-only ceiling, the
naive loop and a DataLoader baseline, 4K captures/s, syncs and memcpys per batch, with the
goals beside them) and compile (time to first batch, recompiles over batch sizes 8 -> 5 -> 8,
steady state against eager). With --device cpu everything a CPU can run runs, at whatever
--size and --n keep it short, and each CUDA-only part prints why it was skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # `python bench/gpu_check.py` runs as `python -m bench.gpu_check` would
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import io
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision.io import ImageReadMode, decode_jpeg

from bench.engine import (
    batches,
    build,
    calibrate,
    ceiling,
    dataloader,
    engine_e2e,
    in_thread,
    listed_captures,
    naive,
    resident_frames,
    sync,
)
from inference.decode import decode, decode_jpegs_on_device, orient, read_header
from inference.device_fault import DeviceFault
from inference.engine import Engine, EngineConfig
from inference.fetch import FetchPolicy
from inference.forward import BatchForward, ForwardOptions
from inference.pipeline_spec import ModelSource
from inference.registry import REGISTRY, LoadedModel, ModelEntry, Pipeline, load_pipeline
from inference.registry import model_source as source
from inference.types import ErrorKind, ItemFailure, WorkItem
from synthetic.scenes import render_scene

FOUR_K = (4096, 2160)
MAD_GOAL = 2.0  # of 255: nvJPEG and libjpeg-turbo differ by IDCT and chroma upsampling only
HYBRID_MS_PER_4K = 3.0  # nvJPEG above this per 4K image: the hybrid (CPU Huffman) backend
GOALS = {"e2e_over_ceiling": 0.90, "e2e_over_naive": 10.0, "e2e_over_dataloader": 2.0,
         "captures_per_s": 300.0}
EXPECTED_ROUTING = {"baseline": True, "grey": True, "exif_rotated": True, "cmyk": False,
                    "progressive": False, "truncated": False}
STICKY_CHILD_EXIT = 76  # as tasks.worker.exits.DEVICE_FAULT_EXIT (not imported: no Celery here)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=Path, help="folder of real captures (default: generated)")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--n", type=int, default=0, help="captures for throughput (cuda 128, cpu 4)")
    p.add_argument("--size", default="4096x2160", help="generated capture size, WxH")
    p.add_argument("--detectors", default="", help="precision check: comma list (default all)")
    p.add_argument("--throughput-detector", default="fasterrcnn_mobilenet_v3_large_fpn")
    p.add_argument("--throughput-classifier", default="resnet50")
    p.add_argument("--classifier-size", type=int, default=128, help="crop side for throughput")
    p.add_argument("--boxes", type=int, default=20, help="detections per image for throughput")
    p.add_argument("--naive-n", type=int, default=0, help="images for the naive loop")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip measurements past this")
    p.add_argument("--keep", action="store_true", help="keep the generated inputs")
    p.add_argument("--sticky-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compile-child", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# reporting


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace(" ", "_")


@dataclass
class Report:
    started: float = field(default_factory=time.monotonic)
    counts: Counter[str] = field(default_factory=Counter)

    def result(self, check: str, status: str, **figures: Any) -> None:
        self.counts[status] += 1
        line = " ".join(f"{k}={_value(v)}" for k, v in figures.items())
        print(f"RESULT check={check} status={status} {line}".rstrip(), flush=True)

    def skip(self, check: str, reason: str) -> None:
        print(f"skipped {check}: {reason}", flush=True)
        self.result(check, "skip", reason=reason.split(":")[0])

    correctness_errors: int = 0

    @property
    def failed(self) -> int:
        """Failed correctness checks, and correctness checks that crashed; a measurement
        that crashed prints status=error but fails nothing."""
        return self.counts["fail"] + self.correctness_errors


@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    folder: Path
    captures: list[Path]
    variants: dict[str, bytes]
    report: Report
    deadline: float

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left_s(self) -> float:
        return self.deadline - time.monotonic()


def run_check(
    ctx: Context, name: str, fn: Callable[[Context], None], correctness: bool
) -> None:
    t0 = time.monotonic()
    try:
        fn(ctx)
    except Exception as e:  # a crashed correctness check is a failed one, with its reason
        traceback.print_exc()
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        ctx.report.result(name, "error", error=f"{type(e).__name__}:{first}")
        ctx.report.correctness_errors += correctness
    finally:
        print(f"  ({name}: {time.monotonic() - t0:.1f} s)", flush=True)


# inputs


def _jpeg(im: Image.Image, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92, **kwargs)
    return buf.getvalue()


def variants_of(im: Image.Image) -> dict[str, bytes]:
    baseline = _jpeg(im)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    return {
        "baseline": baseline,
        "grey": _jpeg(im.convert("L")),
        "exif_rotated": _jpeg(im, exif=exif),
        "cmyk": _jpeg(im.convert("CMYK")),
        "progressive": _jpeg(im, progressive=True),
        "truncated": baseline[: len(baseline) * 2 // 3],
    }


def make_inputs(args: argparse.Namespace, n: int) -> tuple[Path, list[Path], dict[str, bytes]]:
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    folder = Path(tempfile.mkdtemp(prefix="trapq-gpu-check-", dir=parent))
    if args.images:
        captures = listed_captures(args.images, n)
        with Image.open(captures[0]) as first:
            variants = variants_of(first.convert("RGB"))
        return folder, captures, variants
    w, h = (int(x) for x in args.size.lower().split("x"))
    scenes = [render_scene(seed, (w, h))[0] for seed in range(min(n, 2))]
    encoded = [_jpeg(im) for im in scenes]
    captures = []
    for i in range(n):
        path = folder / f"capture_{i:04d}.jpg"
        path.write_bytes(encoded[i % len(encoded)])
        captures.append(path)
    variants = variants_of(scenes[0])
    for name, data in variants.items():
        (folder / f"variant_{name}.jpg").write_bytes(data)
    return folder, captures, variants


def _mad(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.cpu().float() - b.cpu().float()).abs().mean().item()


def _cheap_pipeline(device: torch.device) -> Pipeline:
    return load_pipeline(
        source("constant_boxes", "detector"), source("demo_classifier", "classifier"),
        device=str(device),
    )


# decode


def check_decode(ctx: Context) -> None:
    figures: dict[str, Any] = {}
    ok = True
    for name, data in ctx.variants.items():
        try:
            header = read_header(data, 10**9, name)
        except ItemFailure:
            header = None
        routed = header is not None and header.gpu_decodable
        figures[f"routed_{name}"] = routed
        ok &= routed == EXPECTED_ROUTING[name]
        cpu: torch.Tensor | None = None
        if header is not None:
            try:
                cpu = decode(data, header, name)
            except ItemFailure:
                cpu = None
        figures[f"cpu_{name}"] = "ok" if cpu is not None else "undecodable"
        if not ctx.cuda or header is None:
            continue
        try:  # what nvJPEG itself does with it, routed or not
            raw = orient(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                     mode=ImageReadMode.RGB, device=ctx.device),
                         header.orientation)
            mad = _mad(raw, cpu) if cpu is not None else float("inf")
            figures[f"nvjpeg_{name}"] = "ok" if mad <= MAD_GOAL else "junk"
        except RuntimeError:
            figures[f"nvjpeg_{name}"] = "refused"
        if routed:
            [image] = decode_jpegs_on_device([data], [header], ctx.device)
            mad = _mad(image, cpu) if image is not None and cpu is not None else float("inf")
            figures[f"mad_{name}"] = mad
            ok &= mad <= MAD_GOAL
    ok &= _batch_of_eight_with_one_bad(ctx, figures)
    if ctx.cuda:
        _time_nvjpeg(ctx, figures)
    else:
        print("skipped decode/nvJPEG parts: no CUDA device (outcome per variant, GPU-vs-CPU "
              "difference, ms per 4K image); the batch of 8 ran through torchvision's CPU "
              "batch decode on the engine's GPU-decode path", flush=True)
    figures["mad_goal"] = MAD_GOAL
    ctx.report.result("decode", "pass" if ok else "fail", **figures)


def _batch_of_eight_with_one_bad(ctx: Context, figures: dict[str, Any]) -> bool:
    """Seven good JPEGs and a truncated one through the engine's GPU-decode path: the seven
    are decoded once on it, the truncated one fails alone on the CPU."""
    names = ["baseline"] * 7 + ["truncated"]
    items = []
    for i, name in enumerate(names):
        path = ctx.folder / f"batch8_{i}.jpg"
        path.write_bytes(ctx.variants[name])
        items.append(WorkItem(i, str(path)))
    config = EngineConfig(fetch=FetchPolicy(pool_size=8), batch_size=8, batch_wait_ms=2000,
                          gpu_decode=True)
    engine = Engine(_cheap_pipeline(ctx.device), config)
    engine.gpu_decode = True  # on a CPU, torchvision's decode_jpeg batches the same way
    with engine:
        results = {r.key: r for r in engine.run(items)}
        stats = engine.stats()
    good = sum(results[i].ok for i in range(7))
    bad = results[7].error_kind
    figures.update(batch8_good=good, batch8_bad=bad or "ok", batch8_gpu_decoded=stats.gpu_decoded,
                   batch8_gpu_refused=stats.gpu_refused)
    return good == 7 and bad == ErrorKind.UNDECODABLE and stats.gpu_decoded == 7


def _time_nvjpeg(ctx: Context, figures: dict[str, Any]) -> None:
    data = ctx.variants["baseline"]
    header = read_header(data, 10**9, "baseline")
    datas, headers = [data] * 8, [header] * 8
    stream = torch.cuda.Stream(ctx.device)
    for _ in range(2):  # warm-up: the decoder's state and buffers
        with torch.cuda.stream(stream):
            decode_jpegs_on_device(datas, headers, ctx.device)
    stream.synchronize()
    rounds, gpu_ms, host_ms = 5, 0.0, 0.0
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            start.record(stream)
            decode_jpegs_on_device(datas, headers, ctx.device)
            end.record(stream)
        host_ms += (time.perf_counter() - t0) * 1000
        end.synchronize()
        gpu_ms += start.elapsed_time(end)
    per_4k = (header.width * header.height) / (FOUR_K[0] * FOUR_K[1])
    ms = gpu_ms / (rounds * 8)
    figures.update(
        nvjpeg_ms_per_image=ms,
        host_blocked_ms_per_image=host_ms / (rounds * 8),
        hybrid_suspected=ms / per_4k > HYBRID_MS_PER_4K,
        hybrid_above_ms_per_4k=HYBRID_MS_PER_4K,
    )


# precision


def _matched_error_px(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Median worst-coordinate error of the boxes of `a` matched to `b` (IoU >= 0.5), and the
    share of `a` matched."""
    from torchvision.ops import box_iou

    if len(a) == 0 or len(b) == 0:
        return (0.0 if len(a) == len(b) else float("nan")), float(len(a) == len(b))
    iou = box_iou(a, b)
    best, index = iou.max(dim=1)
    matched = best >= 0.5
    if not matched.any():
        return float("nan"), 0.0
    err = (a[matched] - b[index[matched]]).abs().max(dim=1).values
    return err.median().item(), matched.float().mean().item()


def check_precision(ctx: Context) -> None:
    names = [n for n in ctx.args.detectors.split(",") if n] or sorted(
        n for n, s in REGISTRY.items() if s.role == "detector"
    )
    frames = resident_frames(_cheap_pipeline(ctx.device), ctx.captures[:2])
    reduced = "bf16"
    for name in names:
        kwargs = {}
        if not ctx.cuda and name.startswith(("fasterrcnn", "retinanet")):
            kwargs = {"min_size": 240, "max_size": 320}  # the precision boundary is the same
        torch.manual_seed(0)
        pipe = load_pipeline(
            source(name, "detector", random_weights=True),
            source("demo_classifier", "classifier", random_weights=True),
            device=str(ctx.device), box_threshold=0.0, detector_kwargs=kwargs,
        )
        boxes: dict[str, list[torch.Tensor]] = {}
        dtypes: list[torch.dtype] = []
        for precision in ("fp32", reduced):
            pipe.precision = precision
            forward = BatchForward(pipe, ForwardOptions())
            hook = forward.detector.register_forward_hook(
                lambda _m, _i, out, seen=dtypes: seen.extend(
                    d["boxes"].dtype for d in (out[1] if isinstance(out, tuple) else out)
                )
            )
            try:
                found = forward(frames)
            finally:
                hook.remove()
            boxes[precision] = [
                torch.tensor([[d.x1, d.y1, d.x2, d.y2] for d in image]).reshape(-1, 4)
                for image in found
            ]
        err, share = zip(*(_matched_error_px(a, b)
                           for a, b in zip(boxes["fp32"], boxes[reduced], strict=True)),
                         strict=True)
        count_diff = sum(abs(len(a) - len(b))
                         for a, b in zip(boxes["fp32"], boxes[reduced], strict=True))
        reduced_dtypes = {str(d).removeprefix("torch.") for d in dtypes[len(frames):]}
        ok = reduced_dtypes == {"float32"}
        ctx.report.result(
            f"precision:{name}", "pass" if ok else "fail",
            box_dtype=",".join(sorted(reduced_dtypes)), count_diff=count_diff,
            matched_err_px=statistics.median(err), matched_share=statistics.mean(share),
            boxes_fp32=sum(len(b) for b in boxes["fp32"]), precision=reduced,
        )


# OOM splitting


def check_oom(ctx: Context) -> None:
    if not ctx.cuda:
        return ctx.report.skip("oom", "CUDA only: needs torch.cuda.set_per_process_memory_fraction")
    pipe = _throughput_pipeline(ctx)
    frames = resident_frames(pipe, ctx.captures[:1])
    config = EngineConfig(fetch=FetchPolicy(pool_size=8), batch_size=8, batch_wait_ms=500,
                          max_images_in_flight=16)
    engine = Engine(pipe, config)
    engine.start()  # warm-up before the cap
    try:
        torch.cuda.synchronize(ctx.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
        with torch.inference_mode():
            engine.forward(frames)
        torch.cuda.synchronize(ctx.device)
        peak1 = torch.cuda.max_memory_allocated(ctx.device)
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        fraction = min(0.95, 2.5 * peak1 / total)
        del frames
        torch.cuda.empty_cache()
        ooms0 = torch.cuda.memory_stats(ctx.device).get("num_ooms", 0)
        torch.cuda.set_per_process_memory_fraction(fraction, ctx.device)
        try:
            items = [WorkItem(i, str(p)) for i, p in enumerate(ctx.captures[:16])]
            results = list(engine.run(items))
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, ctx.device)
        ooms = torch.cuda.memory_stats(ctx.device).get("num_ooms", 0) - ooms0
    finally:
        engine.close()
        torch.cuda.empty_cache()
    alone = [r for r in results if r.error and "alone" in r.error]
    other = [r for r in results if not r.ok and r not in alone]
    ctx.report.result(
        "oom", "pass" if not alone and not other else "fail",
        failed_alone=len(alone), failed_other=len(other), goal_failed_alone=0,
        ooms_during_run=ooms, peak_batch1_mb=peak1 / 2**20, cap_mb=fraction * total / 2**20,
        images=len(results),
    )
    if ooms == 0:
        print("  note: no OOM happened under the cap, so the split path did not run", flush=True)


# sticky CUDA errors


class AssertsOnWhite(nn.Module):
    """A detector that indexes out of bounds on the device for an all-white frame (a
    device-side assert) and returns one box otherwise, so that the warm-up passes. A CPU has
    no device-side asserts: there it raises the error CUDA reports, to run the same path."""

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for image in images:
            if image.device.type != "cuda" and bool(image.mean() > 0.99):
                error = getattr(torch, "AcceleratorError", RuntimeError)
                raise error("CUDA error: device-side assert triggered (injected on a CPU)")
            flat = image.flatten()
            white = (image.mean() > 0.99).long()
            index = white * (flat.numel() * 1000) + torch.zeros(1, dtype=torch.long,
                                                                 device=image.device)
            value = flat[index]  # out of bounds for white frames: the kernel asserts
            box = torch.tensor([[0.0, 0.0, 8.0, 8.0]], device=image.device) + value * 0
            out.append({"boxes": box, "scores": torch.ones(1, device=image.device),
                        "labels": torch.ones(1, dtype=torch.long, device=image.device)})
        return out


def sticky_child(device: str) -> int:
    """Run in a subprocess: a device-side assert must end the engine's use of the device and
    reach the caller as DeviceFault; the process then exits as a worker would."""
    dev = torch.device(device)
    spec = ModelEntry("asserts", "detector", "test", (320, 320), 2, None, mean=None, std=None)
    detector = LoadedModel(AssertsOnWhite(), spec,
                           ModelSource("asserts", "", (), (320, 320), None), 2)
    classifier = load_model_for(dev)
    pipe = Pipeline(dev, detector, classifier, None, box_threshold=0.0)
    folder = Path(tempfile.mkdtemp(prefix="trapq-sticky-"))
    white = folder / "white.jpg"
    white.write_bytes(_jpeg(Image.new("RGB", (320, 240), "white")))
    engine = Engine(pipe, EngineConfig(batch_size=1, gpu_decode=False))
    engine.start()
    t0 = time.monotonic()
    try:
        results = list(engine.run([WorkItem(0, str(white))]))
        print(f"STICKY no_fault results={[r.error_kind for r in results]}", flush=True)
        return 1
    except DeviceFault as e:
        print(f"STICKY device_fault after_s={time.monotonic() - t0:.2f} message={e}", flush=True)
    try:
        engine.run([WorkItem(1, str(white))])
        print("STICKY second_run_accepted", flush=True)
        return 1
    except DeviceFault:
        print("STICKY second_run_refused", flush=True)
    sys.stdout.flush()
    os._exit(STICKY_CHILD_EXIT)  # as the worker's hard exit: no CUDA call after the fault


def load_model_for(device: torch.device) -> LoadedModel:
    pipe = _cheap_pipeline(device)
    return pipe.classifier


def check_sticky(ctx: Context) -> None:
    if not ctx.cuda:
        print("sticky on a CPU: the child raises the error CUDA reports instead of a real "
              "device-side assert", flush=True)
    repo = Path(__file__).resolve().parents[1]
    # The child's files go in this run's folder: it ends with os._exit, cleaning nothing up.
    env = {**os.environ, "PYTHONPATH": str(repo), "TMPDIR": str(ctx.folder)}
    t0 = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.gpu_check", "--sticky-child", "--device",
             str(ctx.device)],
            cwd=repo, env=env, capture_output=True, text=True, timeout=180,
        )
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        code, output = None, f"{e.stdout or ''}{e.stderr or ''}"
    lines = [ln for ln in output.splitlines() if ln.startswith("STICKY")]
    ok = code == STICKY_CHILD_EXIT and any("device_fault" in ln for ln in lines) and any(
        "second_run_refused" in ln for ln in lines)
    if not ok:
        print("\n".join(output.splitlines()[-30:]), flush=True)
    ctx.report.result("sticky", "pass" if ok else "fail", exit_code=code,
                      wanted_exit=STICKY_CHILD_EXIT, seconds=time.monotonic() - t0,
                      seen=";".join(ln.split()[1] for ln in lines) or "nothing",
                      injected=not ctx.cuda)


# throughput


def _throughput_pipeline(ctx: Context) -> Pipeline:
    args = argparse.Namespace(
        detector=ctx.args.throughput_detector, classifier=ctx.args.throughput_classifier,
        boxes=ctx.args.boxes, classes=2, device=str(ctx.device), precision="auto",
    )
    return build(args, classifier_size=ctx.args.classifier_size)


def count_syncs(forward: BatchForward, frames: list[torch.Tensor], size: int) -> dict[str, float]:
    """Device syncs and memcpys per batch, from a torch.profiler trace of whole batches."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if forward.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    chunks = list(batches(frames, size))
    with profile(activities=activities) as prof:
        for chunk in chunks:
            forward(chunk)
        sync(forward.device)
    names = Counter(event.name for event in prof.events())
    syncs = sum(n for k, n in names.items()
                if "Synchronize" in k or k == "aten::_local_scalar_dense")
    copies = sum(n for k, n in names.items() if k.startswith(("cudaMemcpy", "Memcpy")))
    return {"syncs_per_batch": syncs / len(chunks), "memcpys_per_batch": copies / len(chunks)}


def _resident_figures(
    ctx: Context, pipe: Pipeline, paths: list[Path]
) -> tuple[float, dict[int, tuple[float, float]], dict[str, float]]:
    """On frames decoded beforehand and resident on the device (freed on return): the score
    threshold for ~--boxes per image, the ceiling per batch size, syncs and memcpys."""
    frames = resident_frames(pipe, paths)
    threshold = calibrate(pipe, frames[:4], ctx.args.boxes)
    forward = BatchForward(pipe, ForwardOptions())
    forward(frames[:1])
    sizes = [8, 16, 32] if ctx.cuda else [1, 2]
    swept = {b: in_thread(lambda b=b: ceiling(forward, frames, b)) for b in sizes}
    best = max(swept, key=lambda b: swept[b][0])
    return threshold, swept, count_syncs(forward, frames[: 3 * best], best)


def check_throughput(ctx: Context) -> None:
    pipe = _throughput_pipeline(ctx)
    paths = ctx.captures
    threshold, swept, syncs = _resident_figures(ctx, pipe, paths)
    best = max(swept, key=lambda b: swept[b][0])
    ceiling_rate, boxes = swept[best]
    if ctx.cuda:
        torch.cuda.empty_cache()
    config = EngineConfig(
        fetch=FetchPolicy(pool_size=8), forward=ForwardOptions(), batch_size=best,
        decode_threads=4 if ctx.cuda else 1, max_images_in_flight=max(4 * best, 16),
        gpu_decode=True,
    )
    e2e, stats = in_thread(lambda: engine_e2e(pipe, paths, config))
    naive_n = ctx.args.naive_n or (16 if ctx.cuda else 1)
    naive_rate = in_thread(lambda: naive(pipe, paths[:naive_n]))
    workers = min(8, os.cpu_count() or 1) if ctx.cuda else 0
    loader_rate = in_thread(lambda: dataloader(pipe, paths, best, workers))
    figures: dict[str, Any] = {
        "captures_per_s": e2e,
        "goal_captures_per_s": GOALS["captures_per_s"],
        "e2e_over_ceiling": e2e / ceiling_rate,
        "goal_e2e_over_ceiling": GOALS["e2e_over_ceiling"],
        "e2e_over_naive": e2e / naive_rate,
        "goal_e2e_over_naive": GOALS["e2e_over_naive"],
        "e2e_over_dataloader": e2e / loader_rate,
        "goal_e2e_over_dataloader": GOALS["e2e_over_dataloader"],
        "ceiling_img_s": ceiling_rate,
        "naive_img_s": naive_rate,
        "dataloader_img_s": loader_rate,
        "batch": best,
        "boxes_per_image": boxes,
        "threshold": threshold,
        "mean_batch": stats.mean_batch_size,
        "device_busy": stats.gpu_busy_fraction,
        "gpu_decoded": stats.gpu_decoded,
        "gpu_reserved_mb": stats.device_reserved_mb,
        **syncs,
        "images": len(paths),
        "frame": _frame(paths[0]),
    }
    if ctx.cuda:
        figures.update(tf32=torch.get_float32_matmul_precision(),
                       cudnn_benchmark=torch.backends.cudnn.benchmark)
    for b, (rate, _) in swept.items():
        figures[f"ceiling_batch{b}_img_s"] = rate
    ctx.report.result("throughput", "measured", **figures)


def _frame(path: Path) -> str:
    with Image.open(path) as im:
        return f"{im.width}x{im.height}"


# torch.compile


def _unique_graphs() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return -1
    return int(counters["stats"]["unique_graphs"])


def check_compile(ctx: Context) -> None:
    """In a subprocess bounded by what is left of --budget-s: inductor's first compile of two
    models can take minutes, and the check as a whole must end in time."""
    if not ctx.cuda:
        return ctx.report.skip("compile", "CUDA only: workers compile for the GPU (inductor)")
    if ctx.left_s() < 120:
        return ctx.report.skip("compile", f"time budget: {ctx.left_s():.0f} s left of --budget-s")
    listing = ctx.folder / "compile_inputs.txt"
    listing.write_text("\n".join(str(p) for p in ctx.captures[:8]))
    repo = Path(__file__).resolve().parents[1]
    argv = [sys.executable, "-m", "bench.gpu_check", "--compile-child", str(listing),
            "--device", str(ctx.device), "--throughput-detector", ctx.args.throughput_detector,
            "--throughput-classifier", ctx.args.throughput_classifier,
            "--classifier-size", str(ctx.args.classifier_size), "--boxes", str(ctx.args.boxes)]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    timeout = max(60.0, ctx.left_s())
    try:
        done = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True,
                              timeout=timeout)
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired:
        return ctx.report.result("compile", "measured", timeout_s=timeout, finished=False)
    found = [ln for ln in output.splitlines() if ln.startswith("COMPILE ")]
    if done.returncode != 0 or not found:
        print("\n".join(output.splitlines()[-30:]), flush=True)
        first = next((ln for ln in reversed(output.splitlines()) if ln.strip()), "no output")
        return ctx.report.result("compile", "error", exit_code=done.returncode,
                                 error=first[:160])
    figures = dict(kv.split("=", 1) for kv in found[-1].split()[1:])
    ctx.report.result("compile", "measured", **figures)


def compile_child(ctx: Context) -> None:
    """Run in a subprocess: time to the first batch with torch.compile in Engine.start,
    recompiles over batch sizes 8 -> 5 -> 8, steady state against eager; one COMPILE line."""
    pipe = _throughput_pipeline(ctx)
    frames = resident_frames(pipe, ctx.captures[:8])
    calibrate(pipe, frames[:4], ctx.args.boxes)
    eager = BatchForward(pipe, ForwardOptions())
    eager(frames)
    eager_rate, _ = ceiling(eager, frames, 8)
    config = EngineConfig(forward=ForwardOptions(compile=True), batch_size=8, gpu_decode=True)
    engine = Engine(pipe, config)
    t0 = time.perf_counter()
    engine.start()  # compiles and warms up on dummy batches of 1 and 8
    start_s = time.perf_counter() - t0
    try:
        graphs0 = _unique_graphs()
        with torch.inference_mode():
            for n in (8, 5, 8):
                engine.forward(frames[:n])
        sync(ctx.device)
        recompiles = _unique_graphs() - graphs0 if graphs0 >= 0 else -1
        rates = [ceiling(engine.forward, frames, 8)[0] for _ in range(3)]
    finally:
        engine.close()
    compiled_rate = statistics.median(rates)
    figures = {
        "time_to_first_batch_s": start_s, "warm_up_s": engine.warm_up_s,
        "recompiles_8_5_8": recompiles, "compiled_img_s": compiled_rate,
        "eager_img_s": eager_rate, "compiled_over_eager": compiled_rate / eager_rate,
    }
    print("COMPILE " + " ".join(f"{k}={_value(v)}" for k, v in figures.items()), flush=True)


# main


def describe(device: torch.device) -> str:
    import torchvision

    parts = [f"torch={torch.__version__}", f"torchvision={torchvision.__version__}",
             f"python={sys.version.split()[0]}", f"device={device}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        parts += [f"gpu={props.name.replace(' ', '_')}",
                  f"capability={props.major}.{props.minor}",
                  f"memory_gb={props.total_memory / 2**30:.0f}",
                  f"cuda={torch.version.cuda}"]
    parts.append(f"cpus={os.cpu_count()}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sticky_child:
        return sticky_child(args.device)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    n = args.n or (128 if device.type == "cuda" else 4)
    report = Report()
    if args.compile_child:
        captures = [Path(p) for p in args.compile_child.read_text().split()]
        compile_child(Context(args, device, args.compile_child.parent, captures, {}, report,
                              report.started + args.budget_s))
        return 0
    print(describe(device), flush=True)
    t0 = time.monotonic()
    folder, captures, variants = make_inputs(args, max(n, 4))
    print(f"inputs: {len(captures)} captures of {_frame(captures[0])} "
          f"({args.images or 'generated'}) and {len(variants)} variants in {folder}, "
          f"{time.monotonic() - t0:.1f} s", flush=True)
    ctx = Context(args, device, folder, captures[:n], variants, report,
                  report.started + args.budget_s)
    try:
        for name, fn in [("decode", check_decode), ("precision", check_precision),
                         ("oom", check_oom), ("sticky", check_sticky)]:
            run_check(ctx, name, fn, correctness=True)
        for name, fn in [("throughput", check_throughput), ("compile", check_compile)]:
            if ctx.left_s() <= 0:
                report.skip(name, f"time budget: past --budget-s {args.budget_s:.0f}")
                continue
            run_check(ctx, name, fn, correctness=False)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    counts = report.counts
    print(f"RESULT gpu_check device={device.type} passed={counts['pass']} "
          f"failed={report.failed} skipped={counts['skip']} measured={counts['measured']} "
          f"errors={counts['error']} "
          f"wall_s={time.monotonic() - report.started:.0f}", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
