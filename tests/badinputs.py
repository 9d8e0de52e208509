"""The bad-input corpus and the local HTTP server that serves its network cases.

Shared by tests/test_bad_inputs_worker.py and bench/faults.py, so the test and the printed
figure come from one code path. Every case says how its work item must end: `done` (a valid
image in an unusual form, with its upright size) or `failed` with an error kind and a phrase
of the reason. Nothing here is large on disk: the 30000x30000 "images" are headers only.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

from tests.local_http import QuietHandler, serving
from tests.worker_jobs import jpeg_bytes

BOMB_SIDE = 30_000
STALL_S = 4.0  # how long /stall keeps a client waiting; the tests' read timeout is shorter
READ_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Case:
    name: str
    uri: str
    state: str  # "done" or "failed"
    kind: str | None = None  # expected error_kind of a failed item
    phrase: str = ""  # part of the expected error text
    size: tuple[int, int] | None = None  # expected upright (width, height) of a done item


HOLD_LIMIT_S = 120.0  # a held request is answered after this long even if never released


class ImageServer:
    """A threaded HTTP server on 127.0.0.1 with the network misbehaviours of the corpus.

    /img/<n>.jpg    a small valid JPEG (seeded by n), after `delay` seconds (query ?delay=);
                    held until `release()` while `hold(...)` selects n (see hold)
    /status/<code>  that HTTP status, empty body
    /stall          sleeps STALL_S before answering (past the read timeout)
    /loop           redirects to itself
    /big, /big-streamed   `big_bytes` bytes, with and without a Content-Length
    /redirect?to=URL      one redirect to URL
    """

    def __init__(self, delay_s: float = 0.0, big_bytes: int = 256 * 1024) -> None:
        self.delay_s = delay_s
        self.big_bytes = big_bytes
        self.requests = 0
        self.hosts: list[str] = []  # Host header of every request
        self.url = ""  # set while serving
        self.held = 0  # requests held since the last hold()
        self._held_images: set[int] = set()
        self._held_event = threading.Event()
        self._selects: Callable[[int], bool] | None = None
        self._gate = threading.Event()
        self._lock = threading.Lock()
        self._stack = ExitStack()

    def hold(self, selects: Callable[[int], bool]) -> None:
        """From now on, hold the request for /img/<n>.jpg with selects(n) until release():
        a client caught at a known point (say the last image of each chunk), for as long as
        the test needs, where a per-image delay only makes that point likely. Each image is
        held once at most: a client that asks for it again (a redelivered chunk) is answered
        at once, so work resumed after a fault runs to its end."""
        with self._lock:
            self._gate = threading.Event()
            self._selects, self.held = selects, 0
            self._held_event.clear()

    def release(self) -> None:
        """Answer the held requests, and hold no more."""
        with self._lock:
            self._selects = None
            self._gate.set()

    def wait_held(self, timeout: float) -> bool:
        """True once a request is held (since the last hold())."""
        return self._held_event.wait(timeout)

    def _gate_for(self, n: int) -> threading.Event | None:
        with self._lock:
            if self._selects is None or n in self._held_images or not self._selects(n):
                return None
            self._held_images.add(n)
            self.held += 1
            self._held_event.set()
            return self._gate

    def __enter__(self) -> ImageServer:
        self.url = self._stack.enter_context(serving(self._handler()))
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self._stack.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(QuietHandler):
            def handle(self) -> None:
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the fault tests kill clients mid-request

            def do_GET(self) -> None:  # noqa: N802
                outer.requests += 1
                outer.hosts.append(self.headers.get("Host", ""))
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                path = parts.path
                if path.startswith("/img/"):
                    seed = int(path.rsplit("/", 1)[1].split(".")[0])
                    gate = outer._gate_for(seed)
                    if gate is not None:
                        gate.wait(HOLD_LIMIT_S)
                    time.sleep(float(query.get("delay", [outer.delay_s])[0]))
                    self.send_body(200, jpeg_bytes(160, 120, seed=seed), "image/jpeg")
                elif path.startswith("/status/"):
                    self.send_body(int(path.rsplit("/", 1)[1]), b"", "text/plain")
                elif path == "/stall":
                    time.sleep(STALL_S)
                    self.send_body(200, jpeg_bytes(), "image/jpeg")
                elif path == "/loop":
                    self.redirect("/loop")
                elif path == "/redirect":
                    self.redirect(query["to"][0])
                elif path == "/big":
                    self.send_body(200, bytes(outer.big_bytes), "image/jpeg")
                elif path == "/big-streamed":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.close_connection = True
                    for _ in range(outer.big_bytes // 4096 + 1):
                        self.wfile.write(bytes(4096))
                else:
                    self.send_body(404, b"", "text/plain")
        return Handler


@contextmanager
def image_server(delay_s: float = 0.0, big_bytes: int = 256 * 1024) -> Iterator[ImageServer]:
    with ImageServer(delay_s, big_bytes) as server:
        yield server


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height 8-bit RGB, with an empty image stream."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose start-of-frame marker is patched to claim width x height."""
    data = bytearray(jpeg_bytes(64, 48))
    sof = data.find(b"\xff\xc0")
    assert sof > 0, "baseline JPEG expected"
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def _exif_rotated() -> bytes:
    """Stored 160x120 with EXIF orientation 6 (rotate 90° clockwise): upright it is 120x160."""
    image = Image.open(io.BytesIO(jpeg_bytes(160, 120, seed=7)))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(image, "JPEG", exif=exif.tobytes())


def build_corpus(folder: Path, server_url: str, max_image_bytes: int) -> list[Case]:
    """Write the file cases under `folder` and describe every case, network ones included."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.open(io.BytesIO(jpeg_bytes(160, 120, seed=3))).convert("RGB")
    gradient = (np.arange(120 * 160, dtype=np.uint32).reshape(120, 160) * 3).astype(np.uint16)
    files: dict[str, bytes] = {
        "truncated.jpg": jpeg_bytes(160, 120, seed=1)[: len(jpeg_bytes(160, 120, seed=1)) // 2],
        "zero.jpg": b"",
        "text.jpg": b"this is a note about the moth trap, not a photograph\n",
        "alpha.png": _encode(rgb.convert("RGBA"), "PNG"),
        "sixteen.png": _encode(Image.fromarray(gradient), "PNG"),
        "gray.jpg": _encode(rgb.convert("L"), "JPEG"),
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "exif6.jpg": _exif_rotated(),
        "bomb.png": _png_header_only(BOMB_SIDE, BOMB_SIDE),
        "bomb.jpg": _jpeg_claiming(BOMB_SIDE, BOMB_SIDE),
        "over_pixels.jpg": _jpeg_claiming(12_000, 9_000),
        "huge.jpg": jpeg_bytes(160, 120, seed=5) + bytes(max_image_bytes),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    f = {name: str(folder / name) for name in files}
    bomb = f"({BOMB_SIDE * BOMB_SIDE} pixels)"
    return [
        Case("truncated JPEG", f["truncated.jpg"], "failed", "undecodable", "truncated.jpg"),
        Case("zero-byte file", f["zero.jpg"], "failed", "undecodable", "empty file"),
        Case("text named .jpg", f["text.jpg"], "failed", "undecodable", "not an image"),
        Case("PNG with alpha", f["alpha.png"], "done", size=(160, 120)),
        Case("16-bit PNG", f["sixteen.png"], "done", size=(160, 120)),
        Case("grayscale JPEG", f["gray.jpg"], "done", size=(160, 120)),
        Case("CMYK JPEG", f["cmyk.jpg"], "done", size=(160, 120)),
        Case("EXIF-rotated JPEG", f["exif6.jpg"], "done", size=(120, 160)),
        Case("30000x30000 PNG", f["bomb.png"], "failed", "too_many_pixels", bomb),
        Case("30000x30000 JPEG", f["bomb.jpg"], "failed", "too_many_pixels", bomb),
        Case("12000x9000 JPEG, over TRAPQ_MAX_IMAGE_PIXELS", f["over_pixels.jpg"], "failed",
             "too_many_pixels", "108000000 pixels is over the limit of 100000000"),
        Case("missing file", str(folder / "missing.jpg"), "failed", "missing", "no such file"),
        Case("file over the byte limit", f["huge.jpg"], "failed", "too_large", "over the limit"),
        Case("HTTP 404", f"{server_url}/status/404", "failed", "http_status", "HTTP 404"),
        Case("HTTP 500", f"{server_url}/status/500", "failed", "http_server", "HTTP 500"),
        Case("HTTP stall past the read timeout", f"{server_url}/stall", "failed", "timeout",
             "timed out"),
        Case("HTTP redirect loop", f"{server_url}/loop", "failed", "network", "redirects"),
        Case("HTTP body over the byte limit", f"{server_url}/big", "failed", "too_large",
             "over the limit"),
        Case("HTTP body over the byte limit, no Content-Length", f"{server_url}/big-streamed",
             "failed", "too_large", "bytes streamed"),
    ]
