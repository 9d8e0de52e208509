"""The backpressure bounds: items being fetched; images and decoded bytes held anywhere from the
end of their fetch to the end of the detector batch that holds them. A producer that would pass
a bound blocks until the engine releases something, so memory stays flat however fast captures
arrive. Fetching has a bound of its own so that fetches stalled on one slow host cannot take
the image slots of captures already fetched: the GPU keeps getting work."""

from __future__ import annotations

import threading


class InFlight:
    def __init__(self, max_images: int, max_bytes: int, max_fetching: int) -> None:
        self.max_images = max_images
        self.max_bytes = max_bytes
        self.max_fetching = max_fetching
        self._cond = threading.Condition()
        self.fetching = 0  # items submitted for fetching and not yet fetched
        self.fetching_peak = 0
        self.images = 0  # slots taken: decoding, queued or in a batch
        self.bytes = 0  # decoded frame bytes held
        self.decoded = 0  # decoded frames (or encoded JPEGs waiting for the GPU decoder) held
        self.images_peak = 0
        self.bytes_peak = 0
        self.decoded_peak = 0

    def acquire_fetch(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.fetching < self.max_fetching)
            self.fetching += 1
            self.fetching_peak = max(self.fetching_peak, self.fetching)

    def release_fetch(self) -> None:
        """The fetch failed or its run was cancelled: it never took an image slot."""
        with self._cond:
            self.fetching -= 1
            self._cond.notify_all()

    def fetched(self) -> None:
        """Trades the fetch slot for an image slot, waiting for one (in the fetch thread)."""
        with self._cond:
            self.fetching -= 1
            self._cond.notify_all()
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
