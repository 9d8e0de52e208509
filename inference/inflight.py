"""The backpressure bound: images and decoded bytes held anywhere between fetch and the end of the
detector batch that holds them. A producer that would pass the bound blocks until the engine
releases something, so memory stays flat however fast captures arrive."""

from __future__ import annotations

import threading


class InFlight:
    def __init__(self, max_images: int, max_bytes: int) -> None:
        self.max_images = max_images
        self.max_bytes = max_bytes
        self._cond = threading.Condition()
        self.images = 0  # slots taken: fetching, decoding, queued or in a batch
        self.bytes = 0  # decoded frame bytes held
        self.decoded = 0  # decoded frames (or encoded JPEGs waiting for the GPU decoder) held
        self.images_peak = 0
        self.bytes_peak = 0
        self.decoded_peak = 0

    def acquire_image(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.images < self.max_images)
            self.images += 1
            self.images_peak = max(self.images_peak, self.images)

    def acquire_bytes(self, n: int) -> None:
        """Blocks until n more bytes fit; one frame larger than the whole bound still passes
        alone, or it would wait forever."""
        with self._cond:
            self._cond.wait_for(lambda: self.bytes == 0 or self.bytes + n <= self.max_bytes)
            self.bytes += n
            self.bytes_peak = max(self.bytes_peak, self.bytes)

    def mark_decoded(self) -> None:
        with self._cond:
            self.decoded += 1
            self.decoded_peak = max(self.decoded_peak, self.decoded)

    def release(self, n_bytes: int, decoded: bool) -> None:
        with self._cond:
            self.images -= 1
            self.bytes -= n_bytes
            if decoded:
                self.decoded -= 1
            self._cond.notify_all()
