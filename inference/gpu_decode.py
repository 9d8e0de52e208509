"""nvJPEG decoding on its own thread and CUDA stream, so that decode overlaps compute.

torchvision's GPU decode blocks its calling thread (it synchronizes its decoder's stream under a
global lock) and makes the caller's current stream wait for the result. Run on the device
thread, that would stall kernel launches for every batch; here a thread of its own decodes
batches of whatever has arrived on a stream of its own, and hands each frame over with the
stream it was made on. The consumer calls `hand_over` on its own stream: `wait_stream` orders
its kernels after the decode, and `record_stream` tells the caching allocator that the frame,
allocated on the decode stream, is in use on the compute stream until that stream's work is
done, so the memory is not given to the next decode too early.

Files the GPU decoder refuses come back to the caller's `refused` callback, which decodes them
on the CPU; they never reach the device thread undecoded.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from inference.decode import Header, decode_jpegs_on_device

T = TypeVar("T")


@dataclass
class _Job(Generic[T]):
    owner: T
    data: bytes
    header: Header


def hand_over(image: torch.Tensor, made_on: torch.cuda.Stream | None) -> torch.Tensor:
    """Make a frame decoded on `made_on` safe to use on the calling thread's current stream.

    A frame with no stream (decoded on the CPU, or by a CPU engine) needs nothing."""
    if made_on is None or image.device.type != "cuda":
        return image
    consumer = torch.cuda.current_stream(image.device)
    if consumer != made_on:
        consumer.wait_stream(made_on)
        image.record_stream(consumer)
    return image


class DeviceDecoder(Generic[T]):
    """One thread and one CUDA stream decoding routed JPEGs in batches of up to `batch_size`.

    `decoded(owner, image, stream)` gets each frame (upright, on the device) with the stream it
    was made on; `refused(owner, data)` gets what the GPU decoder could not decode, from this
    thread (the caller decides where the CPU decode runs).
    """

    def __init__(
        self,
        device: torch.device,
        batch_size: int,
        decoded: Callable[[T, torch.Tensor, torch.cuda.Stream | None], None],
        refused: Callable[[T, bytes], None],
    ) -> None:
        self.device = device
        self.batch_size = batch_size
        self._decoded = decoded
        self._refused = refused
        self._queue: queue.SimpleQueue[_Job[T] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="trapq-gpu-decode", daemon=True)
        self.batches = 0
        self.images = 0
        self.refusals = 0
        self._thread.start()

    def put(self, owner: T, data: bytes, header: Header) -> None:
        self._queue.put(_Job(owner, data, header))

    def close(self) -> None:
        """Decodes what was put before, then stops."""
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        stream: torch.cuda.Stream | None = None
        if self.device.type == "cuda":
            if self.device.index is not None:
                torch.cuda.set_device(self.device)
            stream = torch.cuda.Stream(self.device)
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            stop = False
            while len(jobs) < self.batch_size:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.append(nxt)
            self._decode(jobs, stream)
            if stop:
                return

    def _decode(self, jobs: list[_Job[T]], stream: torch.cuda.Stream | None) -> None:
        context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        try:
            with context:
                images = decode_jpegs_on_device(
                    [j.data for j in jobs], [j.header for j in jobs], self.device
                )
        except Exception:  # not a file's fault (a device fault shows on the device thread too)
            images = [None] * len(jobs)
        self.batches += 1
        for job, image in zip(jobs, images, strict=True):
            if image is None:
                self.refusals += 1
                self._refused(job.owner, job.data)
            else:
                self.images += 1
                self._decoded(job.owner, image, stream)
