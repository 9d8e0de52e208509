"""Shared by the inference tests: images with structure, bad files, a real local HTTP server."""

from __future__ import annotations

import io
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from tests.local_http import QuietHandler, serving


def structured_image(width: int, height: int, seed: int) -> Image.Image:
    """Gradients and filled shapes, so detectors and crops see edges rather than noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [
            x * 255 // max(1, width - 1),
            y * 255 // max(1, height - 1),
            (x + y) * 127 // max(1, width + height),
        ],
        axis=-1,
    ).astype(np.uint8)
    im = Image.fromarray(base)
    draw = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        x1 = min(width - 1, x0 + int(rng.integers(8, max(9, width // 3))))
        y1 = min(height - 1, y0 + int(rng.integers(8, max(9, height // 3))))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.rectangle([x0, y0, x1, y1], fill=color)
    return im


def encode(im: Image.Image, fmt: str = "JPEG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def chw(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


@dataclass
class HttpServer:
    """Routes: /file/<name> serves `files`; /status/<code>; /stall (headers, then silence);
    /loop (redirects to itself); /hop/<name> (one redirect to /file/<name>); /chunked/<n>
    (n bytes without a Content-Length)."""

    files: dict[str, bytes] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    stall_s: float = 3.0
    base: str = ""  # set while serving


@contextmanager
def http_server() -> Iterator[HttpServer]:
    state = HttpServer()

    class Handler(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            state.hits[self.path] += 1
            parts = self.path.strip("/").split("/")
            if parts[0] == "file" and parts[1] in state.files:
                return self.send_body(200, state.files[parts[1]])
            if parts[0] == "status":
                return self.send_body(int(parts[1]), b"nope")
            if parts[0] == "loop":
                return self.redirect("/loop")
            if parts[0] == "hop":
                return self.redirect(f"/file/{parts[1]}")
            if parts[0] == "stall":
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(state.stall_s)
                return None
            if parts[0] == "chunked":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                block = b"y" * 4096
                for _ in range(int(parts[1]) // len(block)):
                    self.wfile.write(f"{len(block):x}\r\n".encode() + block + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
                return None
            return self.send_body(404, b"not found")

    with serving(Handler) as base:
        state.base = base
        yield state
