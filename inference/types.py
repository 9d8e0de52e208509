"""Values that cross the boundary between the engine and its callers."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class ErrorKind(StrEnum):
    """Why one item failed. Only the transient kinds are worth a retry of the chunk."""

    MISSING = "missing"  # no such file / object
    FORBIDDEN = "forbidden"  # scheme, root folder or host not allowed
    HTTP_STATUS = "http_status"  # 4xx; 5xx is HTTP_SERVER
    HTTP_SERVER = "http_server"  # 5xx: the host's fault, transient
    TIMEOUT = "timeout"  # connect or read timeout, transient
    NETWORK = "network"  # connection refused/reset, too many redirects
    TOO_LARGE = "too_large"  # more bytes than max_image_bytes
    TOO_MANY_PIXELS = "too_many_pixels"  # decompression bomb guard
    UNDECODABLE = "undecodable"  # empty, truncated, not an image
    MODEL = "model"  # the model failed on this item alone (e.g. OOM at batch size 1)
    FETCH_BUG = "fetch_bug"  # fetch raised what it does not foresee: trapq's bug, not transient


TRANSIENT_KINDS = frozenset({ErrorKind.HTTP_SERVER, ErrorKind.TIMEOUT, ErrorKind.NETWORK})


class ItemFailure(Exception):
    """Raised inside fetch/decode for a problem of this item alone."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class WorkItem:
    key: int  # the caller's id for the item (a capture id)
    uri: str
    # Given boxes (re-classification): the detector is skipped and only these are classified.
    boxes: tuple[Detection, ...] | None = None


@dataclass
class Classification:
    classifier: str
    label: str
    score: float
    topk: list[tuple[str, float]] = field(default_factory=list)
    # With a taxonomy: the rank of `label` (a label, or the taxon the scores rolled up to).
    rank: str | None = None
    source: str = "classifier"  # prediction_source: inference.rollup.SOURCES
    # The full softmax before any taxa list, float16 (ForwardOptions.probabilities).
    probabilities: bytes | None = None


@dataclass
class Detection:
    """A box in original-image pixels (x1, y1 top-left; x2, y2 bottom-right)."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    label: str
    classifications: list[Classification] = field(default_factory=list)
    source: int | None = None  # the caller's id of the given box this one copies
    # The species classifier's penultimate features, float16 bytes (ForwardOptions.embeddings)
    embedding: bytes | None = None


@dataclass
class ItemResult:
    key: int
    uri: str
    width: int | None = None
    height: int | None = None
    detections: list[Detection] = field(default_factory=list)
    error_kind: ErrorKind | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    @property
    def transient(self) -> bool:
        return self.error_kind in TRANSIENT_KINDS


@dataclass(frozen=True)
class EngineStats:
    """An engine's counters since it started, and its in-flight bound now and at its peak."""

    images: int
    errors: int
    batches: int
    crops: int
    busy_s: float  # device-thread time spent on batches
    elapsed_s: float
    images_in_flight: int
    decoded_in_flight: int
    bytes_in_flight: int
    images_in_flight_peak: int
    decoded_in_flight_peak: int
    bytes_in_flight_peak: int
    max_images_in_flight: int
    max_bytes_in_flight: int
    # torch.cuda's caching allocator for this engine's device (0 on a CPU): what the process
    # holds, read inside it; nvidia-smi's per-process figures need host PIDs, which a
    # container does not see.
    device_allocated_mb: float = 0.0
    device_reserved_mb: float = 0.0
    device_peak_allocated_mb: float = 0.0
    gpu_decoded: int = 0  # JPEGs nvJPEG decoded
    fetching: int = 0  # items being fetched (a bound of their own, apart from images in flight)
    gpu_refused: int = 0  # JPEGs routed to nvJPEG that it refused (decoded on the CPU instead)

    @property
    def mean_batch_size(self) -> float:
        return self.images / self.batches if self.batches else 0.0

    @property
    def gpu_busy_fraction(self) -> float:
        return self.busy_s / self.elapsed_s if self.elapsed_s else 0.0


@dataclass(frozen=True)
class RunStats:
    """What one run (a chunk's items) measured over its own wall time, not the process's."""

    wall_s: float
    fetch_decode_s: float
    gpu_s: float  # its items' share of the device time of the batches they were in
    batches: int  # batches that carried its items
    batch_images: int  # images in those batches, its own and other runs'
    device_busy_s: float  # the engine's device time during the run, for anyone's items

    @property
    def mean_batch_size(self) -> float:
        return self.batch_images / self.batches if self.batches else 0.0

    @property
    def gpu_busy_fraction(self) -> float:
        return self.device_busy_s / self.wall_s if self.wall_s else 0.0
