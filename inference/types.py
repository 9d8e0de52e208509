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
