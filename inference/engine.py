"""The engine: one device thread fed by caller-side fetch and decode pools, bounded end to end.

Several chunk threads call run() at once; their items meet in one queue, so the device thread
forms full batches across chunks and chunk boundaries never drain the pipeline. While a batch is
on the device, the pools fetch and decode the next images, up to the in-flight bound.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from inference.decode import Header, decode, read_header
from inference.device_fault import DeviceFault, fault_line, is_device_fault
from inference.fetch import Fetcher, FetchPolicy
from inference.forward import BatchForward, ForwardOptions, LaunchedImage
from inference.gpu_decode import DeviceDecoder, hand_over
from inference.inflight import InFlight
from inference.registry import Pipeline
from inference.types import (
    Detection,
    EngineStats,
    ErrorKind,
    ItemFailure,
    ItemResult,
    RunStats,
    WorkItem,
)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs: what it may fetch, how it batches, how much it holds. What it computes
    (models, precision, threshold, top-k) is the pipeline's. Built from the TRAPQ_* settings by
    tasks.worker.boot.engine_config."""

    fetch: FetchPolicy = field(default_factory=FetchPolicy)  # its pool_size: fetch threads
    forward: ForwardOptions = field(default_factory=ForwardOptions)
    batch_size: int = 8
    batch_wait_ms: int = 20
    gpu_decode: bool = True
    decode_threads: int = 2
    max_images_in_flight: int = 16
    max_bytes_in_flight: int = 512 * 2**20
    max_image_pixels: int = 100_000_000
    max_fetching: int = 0  # items being fetched, a bound apart from images; 0: 2 x fetch threads


@dataclass
class _Pending:
    """An item between decode and the end of its batch; holds its share of the bound."""

    run: Run
    item: WorkItem
    header: Header
    charge: int
    image: torch.Tensor | None = None  # decoded on the CPU (pinned on CUDA), or by nvJPEG
    encoded: bytes | None = None  # a JPEG on its way to the GPU decoder
    stream: Any = None  # the CUDA stream its frame was decoded on (torch.cuda.Stream)
    settled: bool = False  # its result is out and its share released


@dataclass
class _Done:
    submitted: int
    error: BaseException | None = None


@dataclass
class _Interrupted:
    error: BaseException


class Run:
    """One caller's items: iterate it for ItemResults in completion order.

    Leaving the loop early (break or exception) cancels what has not started and frees its
    share of the bound; results already on the device are dropped when they come back.
    """

    def __init__(self, engine: Engine, items: Iterable[WorkItem], forward: BatchForward) -> None:
        self._engine = engine
        self._items = items
        self.forward = forward  # the pipeline its items go through
        self._results: queue.SimpleQueue[ItemResult | _Done | _Interrupted] = queue.SimpleQueue()
        self._window = threading.Semaphore(2 * engine.config.max_images_in_flight)
        self._lock = threading.Lock()
        self.cancelled = False
        self.fetch_decode_s = 0.0
        self.gpu_s = 0.0
        self.batches = self.batch_images = 0
        self._started_at = time.perf_counter()
        self._busy_s_at_start = engine.stats().busy_s
        self._feeder = threading.Thread(target=self._feed, name="trapq-feed", daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        """Submits items as the bounds allow: the caller's window of unread results, then the
        engine-wide in-flight bound."""
        submitted = 0
        error: BaseException | None = None
        try:
            for item in self._items:
                self._window.acquire()
                if self.cancelled:
                    break
                self._engine._inflight.acquire_fetch()
                if self.cancelled:
                    self._engine._inflight.release_fetch()
                    break
                try:
                    self._engine._fetch_pool.submit(self._engine._fetch_stage, self, item)
                except RuntimeError:  # the engine closed under this run
                    self._engine._inflight.release_fetch()
                    raise
                submitted += 1
        except BaseException as e:  # the caller's iterable failed; report it after the results
            error = e
        self._results.put(_Done(submitted, error))

    def add_times(self, fetch_decode_s: float = 0.0, gpu_s: float = 0.0) -> None:
        with self._lock:
            self.fetch_decode_s += fetch_decode_s
            self.gpu_s += gpu_s

    def add_batch(self, size: int) -> None:
        with self._lock:
            self.batches += 1
            self.batch_images += size

    def stats(self) -> RunStats:
        """This run's own figures so far: its batches, and the device's busy time since it
        started (a chunk row stores these, not the process's figures since start)."""
        wall_s = time.perf_counter() - self._started_at
        # Busy time is counted when a batch ends, so a batch begun before this run started
        # counts whole: the device was busy for at most the run's own wall time.
        busy_s = min(self._engine.stats().busy_s - self._busy_s_at_start, wall_s)
        with self._lock:
            return RunStats(
                wall_s=wall_s,
                fetch_decode_s=self.fetch_decode_s,
                gpu_s=self.gpu_s,
                batches=self.batches,
                batch_images=self.batch_images,
                device_busy_s=busy_s,
            )

    def deliver(self, result: ItemResult) -> None:
        self._results.put(result)

    def __iter__(self) -> Iterator[ItemResult]:
        received, total, error = 0, None, None
        try:
            while total is None or received < total:
                got = self._results.get()
                if isinstance(got, _Interrupted):
                    raise got.error
                if isinstance(got, _Done):
                    total, error = got.submitted, got.error
                    continue
                received += 1
                self._window.release()
                yield got
        finally:
            if total is None or received < total:
                self.close()
        if error is not None:
            raise error

    def close(self) -> None:
        """Stops feeding; safe to call at any time, and needed only for a run never iterated."""
        self.cancelled = True
        self._window.release(2 * self._engine.config.max_images_in_flight)

    def interrupt(self, error: BaseException) -> None:
        """From any thread: the iteration raises `error` now, whatever the items in flight
        are doing (a fetch hanging until its timeout, a long batch); their results are
        dropped when they come back. A caller's deadline, enforced from a timer."""
        self.close()
        self._results.put(_Interrupted(error))

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EngineStartError(Exception):
    """The engine cannot run its models; the message is one line for the operator."""


def tune_cuda() -> None:
    """TF32 for float32 matmuls and convolutions (the float32 parts: box heads, NMS inputs stay
    float32 storage) and cuDNN's algorithm search: a capture's frames share one shape, so the
    search runs once per shape. set_float32_matmul_precision is the API every torch 2.x has."""
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


class Engine:
    """Loaded once per process on one device; run() may be called from any number of threads.

    `pipeline` is the one run() uses by default; runs of other pipelines on the same device
    (prepare()) share its pools, its in-flight bound and its device thread, whose batches are
    split by pipeline.
    """

    def __init__(self, pipeline: Pipeline, config: EngineConfig | None = None) -> None:
        self.pipeline = pipeline
        self.config = config or EngineConfig()
        self.device = pipeline.device
        self.fault: str | None = None  # the CUDA error that ended this engine's device use
        self.warm_up_s = 0.0  # start-up compile and warm-up: the time to the first batch
        self._forward: BatchForward | None = None
        self._fetcher = Fetcher(self.config.fetch)
        self._inflight = InFlight(
            self.config.max_images_in_flight,
            self.config.max_bytes_in_flight,
            self.config.max_fetching or 2 * self.config.fetch.pool_size,
        )
        self._queue: queue.Queue[_Pending | None] = queue.Queue(self.config.max_images_in_flight)
        self._fetch_pool: ThreadPoolExecutor
        self._decode_pool: ThreadPoolExecutor
        self._assemble_pool: ThreadPoolExecutor  # results to objects, off the device thread
        self._thread: threading.Thread | None = None
        # nvJPEG on CUDA. torchvision's decode_jpeg batches the same way on a CPU, where only
        # tests turn this on, to run the routing and hand-off without a GPU.
        self.gpu_decode = self.config.gpu_decode and self.device.type == "cuda"
        self._device_decoder: DeviceDecoder[_Pending] | None = None
        self._stats_lock = threading.Lock()
        self._images = self._batches = self._crops = self._errors = 0
        self._busy_s = 0.0
        self._started_at = 0.0

    def start(self) -> None:
        """Builds the forward, compiles and warms it up (see _warm_up), starts the pools and the
        device thread. Raises EngineStartError, with a one-line reason, if the models cannot
        run a dummy batch: a worker must stop at start then, never fail captures for it."""
        if self._thread is not None:
            return
        if self.device.type == "cuda":
            tune_cuda()
        try:
            self._forward = self.prepare(self.pipeline)
        except Exception as e:
            raise EngineStartError(self._start_failure(e)) from e
        self._fetch_pool = ThreadPoolExecutor(self.config.fetch.pool_size, "trapq-fetch")
        self._decode_pool = ThreadPoolExecutor(self.config.decode_threads, "trapq-decode")
        if self.gpu_decode:
            self._device_decoder = DeviceDecoder(
                self.device, self.config.batch_size, self._gpu_decoded, self._gpu_refused
            )
        self._assemble_pool = ThreadPoolExecutor(1, "trapq-assemble")
        self._started_at = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="trapq-engine", daemon=True)
        self._thread.start()

    @property
    def forward(self) -> BatchForward:
        """The started engine's batch forward (compiled if asked), for timing it alone."""
        if self._forward is None:
            raise RuntimeError("Engine.start() first")
        return self._forward

    def prepare(self, pipeline: Pipeline) -> BatchForward:
        """A pipeline's batch forward on this engine's device, compiled and warmed up (once
        per pipeline, never per run); raises what the models raise on a dummy batch."""
        forward = BatchForward(pipeline, self.config.forward)
        if self.config.forward.compile or self.device.type == "cuda":
            self._warm_up(forward)
        return forward

    def _warm_up(self, forward: BatchForward) -> None:
        """A dummy batch of batch_size 16:9 frames through the detector and a full crop batch
        through the classifiers, so that torch.compile compiles (and cuDNN picks its
        algorithms) before the first capture, and a compiler that cannot work (Triton without
        a C compiler) fails here."""
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(0)
        frames = [
            torch.randint(0, 256, (3, 1080, 1920), dtype=torch.uint8, generator=generator)
            for _ in range(self.config.batch_size)
        ]
        h, w = forward.pipeline.classifier.source.input_size
        crops = torch.rand((self.config.forward.crop_batch_size, 3, h, w), generator=generator)
        with torch.inference_mode():
            frames = [frame.to(self.device) for frame in frames]
            for n in sorted({1, len(frames)}):  # both shapes a compiled forward will see first
                out_of_memory = False
                try:
                    forward(frames[:n])
                except torch.cuda.OutOfMemoryError:
                    if n == 1:
                        raise
                    out_of_memory = True  # serving splits such batches; the start goes on
                if out_of_memory:
                    torch.cuda.empty_cache()
            forward.classify(crops.mul_(255).to(self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warm_up_s += time.perf_counter() - t0

    def _start_failure(self, error: Exception) -> str:
        detail = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {detail[-1][:200] if detail else ''}"
        if isinstance(error, torch.cuda.OutOfMemoryError):
            return (
                f"the models run out of device memory on one dummy frame ({reason}); give "
                "this worker a GPU of its own or smaller models"
            )
        if self.config.forward.compile:
            return (
                f"torch.compile failed on a dummy batch at start-up ({reason}); set "
                "TRAPQ_COMPILE=false, or give the worker a C compiler (Triton builds its "
                "launchers with one)"
            )
        return f"the models failed on a dummy batch of {self.config.batch_size} ({reason})"

    def run(self, items: Iterable[WorkItem], forward: BatchForward | None = None) -> Run:
        """Items through `forward` (a prepare()d pipeline), by default the engine's own."""
        if self._thread is None or self._forward is None:
            raise RuntimeError("Engine.start() first")
        if self.fault is not None:
            raise DeviceFault(f"the device failed earlier in this process: {self.fault}")
        return Run(self, items, forward or self._forward)

    def close(self) -> None:
        """Call once the runs are read: the pools finish what they hold, then the device thread
        does, so no submitted item is left without a result."""
        if self._thread is None:
            return
        self._fetch_pool.shutdown(wait=True, cancel_futures=False)
        self._decode_pool.shutdown(wait=True, cancel_futures=False)
        if self._device_decoder is not None:
            self._device_decoder.close()
            self._device_decoder = None
        self._queue.put(None)
        self._thread.join()
        self._assemble_pool.shutdown(wait=True, cancel_futures=False)
        self._thread = None

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> EngineStats:
        memory: dict[str, float | int] = {}
        if self.device.type == "cuda":
            allocator = torch.cuda.memory_stats(self.device)
            memory = {
                "device_allocated_mb": allocator.get("allocated_bytes.all.current", 0) / 2**20,
                "device_reserved_mb": allocator.get("reserved_bytes.all.current", 0) / 2**20,
                "device_peak_allocated_mb": allocator.get("allocated_bytes.all.peak", 0) / 2**20,
            }
        decoder = self._device_decoder
        if decoder is not None:
            memory.update(gpu_decoded=decoder.images, gpu_refused=decoder.refusals)
        with self._stats_lock:
            inflight = self._inflight
            return EngineStats(
                **memory,
                fetching=inflight.fetching,
                images=self._images,
                errors=self._errors,
                batches=self._batches,
                crops=self._crops,
                busy_s=self._busy_s,
                elapsed_s=time.perf_counter() - self._started_at if self._started_at else 0.0,
                images_in_flight=inflight.images,
                decoded_in_flight=inflight.decoded,
                bytes_in_flight=inflight.bytes,
                images_in_flight_peak=inflight.images_peak,
                decoded_in_flight_peak=inflight.decoded_peak,
                bytes_in_flight_peak=inflight.bytes_peak,
                max_images_in_flight=inflight.max_images,
                max_bytes_in_flight=inflight.max_bytes,
            )

    # caller side: fetch and decode pools

    def _fetch_stage(self, run: Run, item: WorkItem) -> None:
        """Holds a fetch slot while fetching, then trades it for an image slot."""
        if run.cancelled:
            return self._inflight.release_fetch()
        t0 = time.perf_counter()
        try:
            data = self._fetcher.fetch(item.uri)
        except ItemFailure as e:
            kind, message = e.kind, e.message
        except Exception as e:  # not a failure fetch foresaw: a bug, which no retry fixes
            kind, message = ErrorKind.FETCH_BUG, f"fetch failed ({e!r}) for {item.uri}"
        else:
            run.add_times(fetch_decode_s=time.perf_counter() - t0)
            self._inflight.fetched()
            self._decode_pool.submit(self._decode_stage, run, item, data)
            return None
        self._inflight.release_fetch()
        with self._stats_lock:
            self._errors += 1
        if not run.cancelled:
            run.deliver(ItemResult(item.key, item.uri, error_kind=kind, error=message))
        return None

    def _decode_stage(self, run: Run, item: WorkItem, data: bytes) -> None:
        if run.cancelled:
            return self._finish(run, None, charge=0, decoded=False)
        try:
            header = read_header(data, self.config.max_image_pixels, item.uri)
        except ItemFailure as e:
            return self._fail(run, item, e.kind, e.message)
        to_gpu = self.gpu_decode and header.gpu_decodable
        # A JPEG for nvJPEG holds only its encoded bytes in host memory; its frame is made on
        # the device.
        charge = len(data) if to_gpu else header.decoded_bytes
        self._inflight.acquire_bytes(charge)
        t0 = time.perf_counter()
        pending = _Pending(run, item, header, charge)
        self._inflight.mark_decoded()
        if to_gpu and self._device_decoder is not None:
            pending.encoded = data
            self._device_decoder.put(pending, data, header)
            return None
        if self._decode_on_cpu(pending, data):
            run.add_times(fetch_decode_s=time.perf_counter() - t0)
            self._queue.put(pending)
        return None

    def _decode_on_cpu(self, pending: _Pending, data: bytes) -> bool:
        """False: the item failed alone (its result is out, its share released)."""
        try:
            image = decode(data, pending.header, pending.item.uri)
            pending.image = image.pin_memory() if self.device.type == "cuda" else image
            return True
        except ItemFailure as e:
            kind, message = e.kind, e.message
        except Exception as e:
            if is_device_fault(e):  # pin_memory is a CUDA call: a sticky error can show here
                self._on_device_fault([pending], e)
                return False
            kind, message = ErrorKind.UNDECODABLE, f"cannot decode ({e!r}): {pending.item.uri}"
        self._fail(pending.run, pending.item, kind, message, charge=pending.charge, decoded=True)
        return False

    def _gpu_decoded(
        self, pending: _Pending, image: torch.Tensor, stream: torch.cuda.Stream | None
    ) -> None:
        """From the GPU decode thread: the frame and the stream it was made on."""
        pending.image, pending.stream, pending.encoded = image, stream, None
        self._queue.put(pending)

    def _gpu_refused(self, pending: _Pending, data: bytes) -> None:
        """From the GPU decode thread: nvJPEG refused this file alone, so the CPU decodes it
        there (rare, as only nvjpeg_decodable files are routed), never on the device thread.
        Its share grows from encoded to decoded bytes first."""
        pending.encoded = None
        extra = pending.header.decoded_bytes - pending.charge
        if extra > 0:
            self._inflight.acquire_bytes(extra)
            pending.charge += extra
        if self._decode_on_cpu(pending, data):
            self._queue.put(pending)

    def _fail(
        self,
        run: Run,
        item: WorkItem,
        kind: ErrorKind,
        message: str,
        *,
        charge: int = 0,
        decoded: bool = False,
        size: tuple[int, int] | None = None,
    ) -> None:
        width, height = size or (None, None)
        result = ItemResult(item.key, item.uri, width, height, error_kind=kind, error=message)
        with self._stats_lock:
            self._errors += 1
        self._finish(run, result, charge=charge, decoded=decoded)

    def _finish(
        self, run: Run, result: ItemResult | None, *, charge: int, decoded: bool
    ) -> None:
        """Frees the item's share of the bound before the result is handed over, so a slow
        reader never holds decoded frames; a cancelled run's results are dropped."""
        self._inflight.release(charge, decoded)
        if result is not None and not run.cancelled:
            run.deliver(result)

    # device side

    def _loop(self) -> None:
        wait_s = self.config.batch_wait_ms / 1000
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # nvJPEG and kernels of this thread on cuda:N
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.perf_counter() + wait_s
            stop = False
            while len(batch) < self.config.batch_size:
                remaining = deadline - time.perf_counter()
                try:
                    nxt = (
                        self._queue.get(timeout=remaining)
                        if remaining > 0
                        else (self._queue.get_nowait())
                    )
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                if self.fault is not None:  # never touch a faulted device again
                    raise DeviceFault(self.fault)
                self._run_batch(batch)
            except Exception as e:
                if is_device_fault(e):
                    self._on_device_fault(batch, e)
                else:  # a bug: fail the batch, keep the thread
                    message = f"engine failed on this batch ({type(e).__name__}: {e})"[:300]
                    for pending in batch:
                        self._settle(pending, ErrorKind.MODEL, message)
            del batch, first
            if stop:
                return

    def _run_batch(self, batch: list[_Pending]) -> None:
        """Never raises: every item of the batch gets a result, whatever the model does."""
        t0 = time.perf_counter()
        for pending in [p for p in batch if p.run.cancelled]:
            self._settle(pending, None)
        batch = [p for p in batch if not p.run.cancelled]
        if not batch:
            return
        ready: list[tuple[_Pending, torch.Tensor]] = []
        for pending, image in zip(batch, self._to_device(batch), strict=True):
            if isinstance(image, ItemFailure):
                self._settle(pending, image.kind, image.message)
            else:
                ready.append((pending, image))
        outcomes = self._by_pipeline(ready)
        # Frames go before their share of the bound does: else a finished batch's frames live
        # on (here, and in _loop's batch while it waits) beside the new ones that the released
        # shares let in, up to bound + batch_size decoded frames.
        sizes = [(image.shape[-1], image.shape[-2]) for _, image in ready]
        done = [pending for pending, _ in ready]
        del ready, image
        elapsed = time.perf_counter() - t0
        with self._stats_lock:
            self._busy_s += elapsed
            self._batches += 1
            self._images += len(batch)
        share = elapsed / max(1, len(batch))
        for run in {id(p.run): p.run for p in batch}.values():
            run.add_batch(len(batch))
        for pending in done:
            pending.run.add_times(gpu_s=share)
        self._assemble_pool.submit(self._deliver, done, sizes, outcomes)

    def _deliver(
        self,
        done: list[_Pending],
        sizes: list[tuple[int, int]],
        outcomes: list[list[Detection] | LaunchedImage | str],
    ) -> None:
        """On the assembly thread: waits for a launched batch's results, turns them into
        Detection objects and hands each item its result, while the device thread launches the
        next batch. A device fault that surfaces only here fails the batch's items."""
        for pending, (w, h), outcome in zip(done, sizes, outcomes, strict=True):
            if isinstance(outcome, LaunchedImage):
                try:
                    outcome = outcome.detections()
                except Exception as e:
                    if is_device_fault(e):
                        self._on_device_fault([pending], e)
                        continue
                    outcome = f"engine failed on this batch ({type(e).__name__}: {e})"[:300]
            if isinstance(outcome, str):
                self._settle(pending, ErrorKind.MODEL, outcome, (w, h))
                continue
            with self._stats_lock:
                self._crops += len(outcome)
            self._settle(pending, ItemResult(pending.item.key, pending.item.uri, w, h, outcome))

    def _on_device_fault(self, batch: list[_Pending], error: BaseException) -> None:
        """A CUDA error that lasts for the process: the device is not used again, the runs of
        these items (and of every later item) raise DeviceFault, and their items stay pending
        for a retry in a fresh process. Nothing is failed for the device's fault."""
        with self._stats_lock:
            if self.fault is None:
                self.fault = fault_line(error)
        fault = DeviceFault(f"CUDA device fault; this process must restart ({self.fault})")
        for pending in batch:
            pending.run.interrupt(fault)
            self._settle(pending, None)

    def _settle(
        self,
        pending: _Pending,
        outcome: ItemResult | ErrorKind | None,
        message: str = "",
        size: tuple[int, int] | None = None,
    ) -> None:
        """Ends an item that reached the device thread, exactly once."""
        if pending.settled:
            return
        pending.settled = True
        if isinstance(outcome, ErrorKind):
            self._fail(pending.run, pending.item, outcome, message, charge=pending.charge,
                       decoded=True, size=size)
        else:
            self._finish(pending.run, outcome, charge=pending.charge, decoded=True)

    def _to_device(self, batch: list[_Pending]) -> list[torch.Tensor | ItemFailure]:
        """Every item arrives decoded: on the CPU (copied here) or by nvJPEG on its own stream
        (handed over to this thread's stream)."""
        images: list[torch.Tensor | ItemFailure] = []
        for p in batch:
            if p.image is None:
                images.append(ItemFailure(ErrorKind.UNDECODABLE, f"not decoded: {p.item.uri}"))
                continue
            image = p.image
            if image.device != self.device:
                image = image.to(self.device, non_blocking=True)
            images.append(hand_over(image, p.stream))
            p.image = p.stream = None  # the batch's list holds the frame from here
        return images

    def _by_pipeline(
        self, ready: list[tuple[_Pending, torch.Tensor]]
    ) -> list[list[Detection] | LaunchedImage | str]:
        """A batch may hold chunks of several pipelines: each pipeline's items go through
        its own forward, results back in the batch's order."""
        groups: dict[int, list[int]] = {}
        for i, (pending, _) in enumerate(ready):
            groups.setdefault(id(pending.run.forward), []).append(i)
        out: list[list[Detection] | LaunchedImage | str] = [[] for _ in ready]
        for members in groups.values():
            forward = ready[members[0]][0].run.forward
            found = self._detect_splitting([ready[i] for i in members], forward)
            for i, outcome in zip(members, found, strict=True):
                out[i] = outcome
        return out

    def _forward_batch(
        self, ready: list[tuple[_Pending, torch.Tensor]], forward: BatchForward
    ) -> list[list[Detection] | LaunchedImage]:
        """Items that come with boxes (re-classification) skip the detector: only their crops
        go through the classifiers. A batch may hold both kinds (chunks of several jobs)."""
        out: list[list[Detection] | LaunchedImage] = [[] for _ in ready]
        given = [i for i, (p, _) in enumerate(ready) if p.item.boxes is not None]
        fresh = [i for i, (p, _) in enumerate(ready) if p.item.boxes is None]
        if given:
            boxes = [ready[i][0].item.boxes or () for i in given]
            found = forward.launch_given([ready[i][1] for i in given], boxes)
            for i, image in zip(given, found.per_image(), strict=True):
                out[i] = image
        if fresh:
            launched = forward.launch([ready[i][1] for i in fresh])
            for i, image in zip(fresh, launched.per_image(), strict=True):
                out[i] = image
        return out

    def _detect_splitting(
        self, ready: list[tuple[_Pending, torch.Tensor]], forward: BatchForward
    ) -> list[list[Detection] | LaunchedImage | str]:
        """On any model failure (CUDA out-of-memory above all) halve the batch and retry, so
        that only an item that fails alone is reported as the model's failure.

        The retry runs after the except block, never inside it: the exception's traceback holds
        the failed attempt's frames and with them its activations, which would otherwise stay
        allocated through empty_cache() and every nested retry, until images that fit alone
        fail "out of memory on this image alone"."""
        if not ready:
            return []
        try:
            return self._forward_batch(ready, forward)
        except Exception as e:
            out_of_memory = isinstance(e, torch.cuda.OutOfMemoryError)
            device_fault = is_device_fault(e)
            fault = fault_line(e)
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        # Here the exception, its traceback and the attempt's tensors are gone.
        if device_fault:  # splitting cannot help: every later CUDA call fails too
            raise DeviceFault(fault)
        if out_of_memory and self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(ready) == 1:
            kind = "out of memory" if out_of_memory else "failed"
            return [f"model {kind} on this image alone ({first}): {ready[0][0].item.uri}"]
        mid = len(ready) // 2
        return (self._detect_splitting(ready[:mid], forward)
                + self._detect_splitting(ready[mid:], forward))
