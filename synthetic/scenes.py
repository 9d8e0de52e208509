"""Synthetic moth-trap nights: lit sheets with insects of eight kinds, and their ground truth.

The demo and the accuracy tests need captures whose true boxes and kinds are known, without
shipping real (licensed, large) images. Every insect is drawn analytically in its own rotated
frame (signed distances of ellipses and convex polygons), so a scene of 40 insects renders in a
few hundred milliseconds with numpy alone and every box is exact.

A night is reproducible: capture ``i`` of seed ``s`` depends only on ``(s, i)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from scipy.spatial import ConvexHull

KINDS: tuple[str, ...] = (
    "geometrid",
    "noctuid",
    "arctiid",
    "sphingid",
    "saturniid",
    "pyralid",
    "pterophorid",
    "ctenuchid",
)
TRUTH_FILE = "ground_truth.json"
REFERENCE_WIDTH = 1920  # insect sizes are given for this width and scale with the image
DEFAULT_START = datetime(2026, 6, 21, 21, 0, 0)
DEFAULT_INTERVAL = timedelta(minutes=10)
MAX_INSECTS = 40
EXIF_IFD = 0x8769
EXIF_DATETIME_ORIGINAL = 0x9003
EXIF_DATETIME = 0x0132


@dataclass(frozen=True)
class Insect:
    """One insect: its kind and its box (x1, y1, x2, y2) in image pixels, x2/y2 exclusive.
    ``individual`` is its identity across the captures of a tracked night (synthetic.nights)."""

    kind: str
    box: tuple[float, float, float, float]
    individual: int | None = None


@dataclass(frozen=True)
class SceneTruth:
    file: str  # image name, relative to the night's folder
    taken_at: datetime
    width: int
    height: int
    insects: tuple[Insect, ...]

    @property
    def boxes(self) -> list[tuple[float, float, float, float]]:
        return [i.box for i in self.insects]

    @property
    def kinds(self) -> list[str]:
        return [i.kind for i in self.insects]


# --- shapes in the insect's frame: u across the body (mirrored), v along it, head at v < 0 ---


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, a: float, b: float) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipse (negative inside)."""
    return (np.sqrt(((u - cu) / a) ** 2 + ((v - cv) / b) ** 2) - 1.0) * min(a, b)


def _polygon(u: np.ndarray, v: np.ndarray, pts: Sequence[tuple[float, float]]) -> np.ndarray:
    """Signed distance (exact inside, a lower bound outside) to a convex CCW polygon."""
    sd = np.full(u.shape, -np.inf, dtype=np.float32)
    n = len(pts)
    for k in range(n):
        (u0, v0), (u1, v1) = pts[k], pts[(k + 1) % n]
        eu, ev = u1 - u0, v1 - v0
        length = float(np.hypot(eu, ev))
        # outward normal of a counter-clockwise edge in (u, v)
        sd = np.maximum(sd, ((u - u0) * ev - (v - v0) * eu) / length)
    return sd


def _segment(u: np.ndarray, v: np.ndarray, p0: tuple[float, float], p1: tuple[float, float],
             width: float) -> np.ndarray:
    du, dv = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((u - p0[0]) * du + (v - p0[1]) * dv) / (du * du + dv * dv), 0.0, 1.0)
    return np.hypot(u - p0[0] - t * du, v - p0[1] - t * dv) - width


def _ccw(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    area = sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(pts, pts[1:] + pts[:1], strict=True))
    return pts if area > 0 else pts[::-1]


@dataclass(frozen=True)
class _Drawing:
    body: np.ndarray  # signed distance of the parts that count for the box (body and wings)
    extra: np.ndarray  # signed distance of antennae, legs, tails drawn outside the box
    color: np.ndarray  # (h, w, 3) colour where the insect is


KindPainter = Callable[[np.ndarray, np.ndarray, np.random.Generator], _Drawing]


def _rgb(shape: tuple[int, ...], c: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    jitter = rng.uniform(0.9, 1.08) * (1 + rng.uniform(-0.04, 0.04, 3))
    return np.broadcast_to(np.clip(np.asarray(c) * jitter, 0, 1), (*shape, 3)).astype(np.float32)


def _paint(color: np.ndarray, where: np.ndarray, c: Sequence[float]) -> np.ndarray:
    return np.where(where[..., None], np.asarray(c, dtype=np.float32), color)


def _antennae(u: np.ndarray, v: np.ndarray, spread: float, length: float, w: float) -> np.ndarray:
    return _segment(np.abs(u), v, (0.04, -0.85), (spread, -0.85 - length), w)


def _geometrid(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> _Drawing:
    au = np.abs(u)
    fore = _polygon(au, v, _ccw([(0.0, -0.55), (1.3, -0.25), (0.95, 0.4), (0.0, 0.2)]))
    hind = _ellipse(au, v, 0.5, 0.42, 0.5, 0.34)
    body = np.minimum(np.minimum(fore, hind), _ellipse(u, v, 0, 0, 0.11, 0.8))
    color = _rgb(u.shape, (0.78, 0.8, 0.7), rng)
    r = np.hypot(au, v + 0.3)
    bands = np.abs(np.sin(9.0 * r + 0.8 * np.sin(9.0 * au))) < 0.18
    color = _paint(color, bands & (au > 0.12), (0.45, 0.44, 0.38))
    return _Drawing(body, _antennae(u, v, 0.35, 0.35, 0.025), color)


def _noctuid(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> _Drawing:
    au = np.abs(u)
    wings = _polygon(au, v, _ccw([(0.0, -0.8), (0.42, -0.6), (0.55, 0.7), (0.0, 1.0)]))
    head = _ellipse(u, v, 0, -0.82, 0.2, 0.15)
    color = _rgb(u.shape, (0.36, 0.26, 0.18), rng)
    kidney = np.abs(_ellipse(au, v, 0.26, -0.1, 0.09, 0.15)) < 0.03
    line = np.abs(v - 0.45 - 0.08 * np.sin(20 * au)) < 0.035
    color = _paint(color, kidney | line, (0.72, 0.62, 0.48))
    return _Drawing(np.minimum(wings, head), _antennae(u, v, 0.3, 0.3, 0.02), color)


def _arctiid(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> _Drawing:
    au = np.abs(u)
    wings = _polygon(au, v, _ccw([(0.0, -0.8), (0.5, -0.55), (0.62, 0.6), (0.3, 0.95),
                                  (0.0, 1.0)]))
    color = _rgb(u.shape, (0.97, 0.62, 0.15), rng)
    spots = np.sin(8.0 * au + 0.5) * np.sin(7.0 * v) > 0.55
    color = _paint(color, spots | (v < -0.62), (0.08, 0.07, 0.06))
    return _Drawing(wings, _antennae(u, v, 0.3, 0.3, 0.025), color)


def _sphingid(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> _Drawing:
    au = np.abs(u)
    wing = _polygon(au, v, _ccw([(0.08, -0.55), (1.1, 0.12), (1.02, 0.34), (0.08, 0.0)]))
    body = _ellipse(u, v, 0, 0.1, 0.16, 0.95)
    color = _rgb(u.shape, (0.56, 0.56, 0.55), rng)
    streak = np.abs(_polygon(au, v, _ccw([(0.15, -0.4), (1.0, 0.2), (0.15, -0.2)]))) < 0.03
    color = _paint(color, streak, (0.2, 0.2, 0.2))
    abdomen = (body < 0) & (v > 0.2)
    stripes = np.sin(28.0 * v) > 0
    color = _paint(color, abdomen & stripes, (0.9, 0.45, 0.55))
    color = _paint(color, abdomen & ~stripes, (0.06, 0.06, 0.06))
    return _Drawing(np.minimum(wing, body), np.full(u.shape, np.inf, np.float32), color)


def _saturniid(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> _Drawing:
    au = np.abs(u)
    fore = _polygon(au, v, _ccw([(0.05, -0.6), (1.0, -0.55), (0.85, 0.1), (0.05, 0.15)]))
    hind = _ellipse(au, v, 0.45, 0.35, 0.45, 0.35)
    body = _ellipse(u, v, 0, 0, 0.14, 0.6)
    tails = _ellipse(au, v, 0.3, 0.95, 0.08, 0.35)
    color = _rgb(u.shape, (0.6, 0.86, 0.45), rng)
    color = _paint(color, (fore < 0) & (v < -0.48), (0.5, 0.25, 0.35))
    eye = np.hypot(au - 0.5, v + 0.15)
    color = _paint(color, eye < 0.11, (0.35, 0.2, 0.12))
    color = _paint(color, eye < 0.06, (0.95, 0.85, 0.3))
    color = _paint(color, body < 0, (0.96, 0.95, 0.9))
    wings = np.minimum(np.minimum(fore, hind), body)
    return _Drawing(wings, np.minimum(tails, _antennae(u, v, 0.35, 0.3, 0.06)), color)


def _pyralid(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> _Drawing:
    au = np.abs(u)
    wings = _polygon(au, v, _ccw([(0.0, -0.9), (0.8, 0.8), (0.0, 0.6)]))
    color = _rgb(u.shape, (0.8, 0.64, 0.42), rng)
    band = np.abs(v - 0.1 - 0.3 * au) < 0.09
    color = _paint(color, band, (0.38, 0.26, 0.16))
    return _Drawing(wings, np.full(u.shape, np.inf, np.float32), color)


def _pterophorid(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> _Drawing:
    au = np.abs(u)
    body = _ellipse(u, v, 0, 0.1, 0.08, 0.95)
    wings = _polygon(au, v, _ccw([(0.0, -0.5), (1.0, -0.42), (1.0, -0.28), (0.0, -0.22)]))
    color = _rgb(u.shape, (0.66, 0.55, 0.4), rng)
    dots = (np.abs(au - 0.6) < 0.05) | (np.abs(au - 0.9) < 0.05)
    color = _paint(color, dots & (wings < 0), (0.3, 0.22, 0.15))
    legs = _segment(au, v, (0.05, 0.1), (0.5, 0.75), 0.02)
    return _Drawing(np.minimum(body, wings), legs, color)


def _ctenuchid(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> _Drawing:
    au = np.abs(u)
    wings = _polygon(au, v, _ccw([(0.0, -0.65), (0.36, -0.58), (0.46, 0.92), (0.0, 0.86)]))
    head = _ellipse(u, v, 0, -0.72, 0.15, 0.13)
    color = _rgb(u.shape, (0.1, 0.1, 0.16), rng)
    windows = (_ellipse(au, v, 0.22, -0.2, 0.08, 0.13) < 0) | (
        _ellipse(au, v, 0.27, 0.4, 0.09, 0.15) < 0
    )
    color = _paint(color, windows, (0.93, 0.93, 0.9))
    color = _paint(color, head < 0, (0.97, 0.5, 0.1))
    return _Drawing(np.minimum(wings, head), _antennae(u, v, 0.28, 0.35, 0.025), color)


@dataclass(frozen=True)
class _KindSpec:
    paint: KindPainter
    reach: float  # largest distance from the centre in units of the half-length
    half_length: tuple[float, float]  # px at REFERENCE_WIDTH


_SPECS: dict[str, _KindSpec] = {
    "geometrid": _KindSpec(_geometrid, 1.45, (18, 42)),
    "noctuid": _KindSpec(_noctuid, 1.3, (18, 42)),
    "arctiid": _KindSpec(_arctiid, 1.3, (18, 38)),
    "sphingid": _KindSpec(_sphingid, 1.2, (28, 62)),
    "saturniid": _KindSpec(_saturniid, 1.45, (38, 70)),
    "pyralid": _KindSpec(_pyralid, 1.25, (14, 26)),
    "pterophorid": _KindSpec(_pterophorid, 1.1, (20, 36)),
    "ctenuchid": _KindSpec(_ctenuchid, 1.3, (20, 36)),
}


# --- the sheet ---


def _sheet(rng: np.random.Generator, w: int, h: int, night: np.random.Generator) -> np.ndarray:
    """Lamp-lit fabric: a saturated hot spot, fall-off, wrinkles and a fine weave."""
    tint = np.array([0.9, 0.9, 0.93], np.float32) * (1 + night.uniform(-0.03, 0.03, 3))
    cx, cy = night.uniform(0.3, 0.7) * w, night.uniform(0.3, 0.7) * h
    sigma = night.uniform(0.35, 0.6) * w
    xs = np.arange(w, dtype=np.float32)
    ys = np.arange(h, dtype=np.float32)
    gx = np.exp(-(((xs - cx) / sigma) ** 2))
    gy = np.exp(-(((ys - cy) / sigma) ** 2))
    light = 0.72 + 0.45 * np.outer(gy, gx) * rng.uniform(0.9, 1.1)
    low = rng.normal(0.0, 0.025, (9, 16)).astype(np.float32)
    wrinkles = np.asarray(
        Image.fromarray(low, mode="F").resize((w, h), Image.Resampling.BICUBIC), np.float32
    )
    px = REFERENCE_WIDTH / w
    weave = 0.012 * np.outer(np.sin(ys * px * 2.1), np.sin(xs * px * 1.9)).astype(np.float32)
    folds = np.zeros(w, np.float32)
    for _ in range(int(night.integers(1, 4))):
        fx, fw = night.uniform(0, w), night.uniform(3, 12) / px
        folds -= 0.04 * np.exp(-(((xs - fx) / fw) ** 2))
    shade = (light + wrinkles + weave + folds[None, :])[..., None]
    return np.clip(shade * tint, 0.0, 1.0).astype(np.float32)


def _debris(img: np.ndarray, rng: np.random.Generator, scale: float) -> None:
    """Specks of dust and tiny flies: too small to be insects of interest."""
    h, w, _ = img.shape
    for _ in range(int(rng.integers(5, 30))):
        r = rng.uniform(1.0, 3.0) * scale
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        x0, x1 = int(max(0, x - r - 1)), int(min(w, x + r + 2))
        y0, y1 = int(max(0, y - r - 1)), int(min(h, y + r + 2))
        yy, xx = np.mgrid[y0:y1, x0:x1]
        a = np.clip(r - np.hypot(xx - x, yy - y), 0, 1)[..., None] * 0.8
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a) + a * np.float32(rng.uniform(0.1, 0.4))


def _iou_and_cover(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, float]:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0, 0.0
    inter = iw * ih
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter), inter / min(area_a, area_b)


def _draw_insect(img: np.ndarray, rng: np.random.Generator, kind: str, scale: float,
                 placed: list[Insect]) -> Insect | None:
    """Draws one insect where it fits (no overlap, or a small one now and then); None if not."""
    h, w, _ = img.shape
    spec = _SPECS[kind]
    r = rng.uniform(*spec.half_length) * scale
    theta = rng.uniform(0, 2 * np.pi)
    edge = rng.choice([1.0, 1.0, 1.0, 1.8, 2.6]) * max(scale, 0.5)  # px of edge softness (focus)
    half = int(np.ceil(spec.reach * r + 3 * edge + 2))
    if 2 * half + 1 > min(w, h):
        return None  # the insect's patch does not fit in the image at all
    overlap_ok = rng.random() < 0.15
    for _ in range(20):
        # The patch spans int(c) - half .. int(c) + half inclusive, so c stays below size - half.
        cx = min(rng.uniform(half, w - half), w - half - 1.0)
        cy = min(rng.uniform(half, h - half), h - half - 1.0)
        if overlap_ok and placed:
            other = placed[int(rng.integers(len(placed)))].box
            cx = float(np.clip(rng.uniform(other[0], other[2]), half, w - half - 1.0))
            cy = float(np.clip(rng.uniform(other[1], other[3]), half, h - half - 1.0))
        approx = (cx - r, cy - r, cx + r, cy + r)
        limit = 0.3 if overlap_ok else 0.0
        if all(_iou_and_cover(approx, p.box)[1] <= limit for p in placed):
            break
    else:
        return None
    shape = _shape(kind, r, theta, edge, cx, cy, half, rng)
    if shape is None:
        return None
    for p in placed:
        iou, cover = _iou_and_cover(shape.box, p.box)
        if cover > (0.35 if overlap_ok else 0.0) or iou > 0.3:
            return None
    _composite(img, shape, rng, scale)
    return Insect(kind, shape.box)


@dataclass(frozen=True)
class _Shape:
    """An insect rasterised in its patch of the image, before it is painted in."""

    x0: int  # top-left of the patch in the image
    y0: int
    drawing: _Drawing
    body_alpha: np.ndarray  # coverage of the parts that count for the box
    alpha: np.ndarray  # coverage of everything drawn
    box: tuple[float, float, float, float]
    r: float
    edge: float


def _shape(kind: str, r: float, theta: float, edge: float, cx: float, cy: float, half: int,
           rng: np.random.Generator) -> _Shape | None:
    """Rasterises an insect of half-length ``r`` at (cx, cy), turned by ``theta``, in a square
    patch of ``2 * half + 1`` pixels; None if nothing of its body is left."""
    x0, y0 = int(cx) - half, int(cy) - half
    yy, xx = np.mgrid[y0:y0 + 2 * half + 1, x0:x0 + 2 * half + 1].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    u = (dx * c + dy * s) / r
    v = (-dx * s + dy * c) / r
    d = _SPECS[kind].paint(u, v, rng)
    body_a = np.clip(0.5 - d.body * r / edge, 0, 1)
    alpha = np.maximum(body_a, np.clip(0.5 - d.extra * r / edge, 0, 1))
    ys, xs = np.nonzero(body_a >= 0.5)
    if len(xs) == 0:
        return None
    box = (float(x0 + xs.min()), float(y0 + ys.min()), float(x0 + xs.max() + 1),
           float(y0 + ys.max() + 1))
    return _Shape(x0, y0, d, body_a, alpha, box, r, edge)


def _composite(img: np.ndarray, shape: _Shape, rng: np.random.Generator, scale: float) -> None:
    """Paints a rasterised insect and its shadow into the image."""
    d, alpha, r, edge = shape.drawing, shape.alpha, shape.r, shape.edge
    shade = rng.uniform(0.85, 1.1) * (1 + rng.normal(0, 0.03, alpha.shape)).astype(np.float32)
    color = np.clip(d.color * shade[..., None], 0, 1)
    size = alpha.shape[0]
    patch = img[shape.y0:shape.y0 + size, shape.x0:shape.x0 + size]
    sh = max(1, int(round(2 * scale)))
    shadow = np.zeros_like(alpha)
    shadow[sh:, sh:] = np.clip(0.5 - d.body[:-sh, :-sh] * r / (4 * edge), 0, 1)[...] * 0.25
    patch *= (1 - shadow)[..., None]
    a = alpha[..., None]
    patch[...] = patch * (1 - a) + color * a


def render_scene(seed: int | Sequence[int], size: tuple[int, int] = (1920, 1080),
                 scale: float | None = None, n_insects: int | None = None,
                 night_seed: int | None = None) -> tuple[Image.Image, tuple[Insect, ...]]:
    """One capture in memory. ``scale`` (default width/1920) sizes the insects; the training
    script renders crops at scale 1 to see insects as big as in a 1920x1080 capture."""
    w, h = size
    rng = np.random.default_rng(seed)
    night = np.random.default_rng(night_seed if night_seed is not None else rng.integers(2**32))
    scale = w / REFERENCE_WIDTH if scale is None else scale
    img = _sheet(rng, w, h, night)
    _debris(img, rng, scale)
    if n_insects is None:
        n_insects = int(rng.integers(0, MAX_INSECTS + 1))
    placed: list[Insect] = []
    for _ in range(n_insects):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        insect = _draw_insect(img, rng, kind, scale, placed)
        if insect is not None:
            placed.append(insect)
    return _develop(img, rng, scale), tuple(placed)


def _develop(img: np.ndarray, rng: np.random.Generator, scale: float) -> Image.Image:
    """Exposure, sensor noise and now and then a little defocus, as the camera adds them."""
    img *= np.float32(rng.uniform(0.92, 1.05))  # exposure
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(0.005, 0.025))
    out = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    if rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0) * scale))
    return out


@dataclass(frozen=True)
class Placement:
    """Where and how one known individual sits in a capture of a tracked night: centre and
    half-length in pixels, turn in radians, edge softness in pixels. ``appearance`` seeds its
    colours, so the same individual looks the same in every capture."""

    individual: int
    kind: str
    cx: float
    cy: float
    r: float
    theta: float
    edge: float
    appearance: int


def half_length_range(kind: str) -> tuple[float, float]:
    """Half-lengths (px at REFERENCE_WIDTH) an insect of ``kind`` is drawn with."""
    return _SPECS[kind].half_length


def patch_half(kind: str, r: float, edge: float) -> int:
    """Half the side of the square patch an insect is drawn in; its centre must stay at least
    this far inside the image (and below size - half - 1 at the far edge)."""
    return int(np.ceil(_SPECS[kind].reach * r + 3 * edge + 2))


@lru_cache(maxsize=len(KINDS))
def kind_outline(kind: str) -> np.ndarray:
    """Convex hull (k, 2) of the body of ``kind`` in its own frame (u across, v along, in
    half-lengths): a box for any turn and size without rendering (the tracking bench's)."""
    g = np.linspace(-1.6, 1.6, 321, dtype=np.float32)
    u, v = np.meshgrid(g, g)
    body = _SPECS[kind].paint(u, v, np.random.default_rng(0)).body
    pts = np.stack([u[body < 0], v[body < 0]], axis=1)
    return pts[ConvexHull(pts).vertices]


def render_placements(seed: int | Sequence[int], size: tuple[int, int],
                      placements: Sequence[Placement],
                      night_seed: int) -> tuple[Image.Image, tuple[Insect, ...]]:
    """One capture of a tracked night: the sheet and debris of ``seed``, the given individuals
    where they are (later ones over earlier ones), and their exact boxes and identities."""
    w, h = size
    rng = np.random.default_rng(seed)
    scale = w / REFERENCE_WIDTH
    img = _sheet(rng, w, h, np.random.default_rng(night_seed))
    _debris(img, rng, scale)
    drawn: list[Insect] = []
    for p in placements:
        looks = np.random.default_rng(p.appearance)
        shape = _shape(p.kind, p.r, p.theta, p.edge, p.cx, p.cy,
                       patch_half(p.kind, p.r, p.edge), looks)
        if shape is not None:
            _composite(img, shape, looks, scale)
            drawn.append(Insect(p.kind, shape.box, p.individual))
    return _develop(img, rng, scale), tuple(drawn)


def capture_exif(taken_at: datetime) -> Image.Exif:
    exif = Image.Exif()
    stamp = taken_at.strftime("%Y:%m:%d %H:%M:%S")
    exif[EXIF_DATETIME] = stamp
    exif.get_ifd(EXIF_IFD)[EXIF_DATETIME_ORIGINAL] = stamp
    return exif


def generate_night(out_dir: Path, n: int, seed: int, size: tuple[int, int] = (1920, 1080),
                   start: datetime | None = None,
                   interval: timedelta = DEFAULT_INTERVAL) -> list[SceneTruth]:
    """Writes ``n`` JPEG captures (EXIF DateTimeOriginal every ``interval`` from ``start``) and
    ``ground_truth.json`` into ``out_dir``; returns the truth. Same seed, same night."""
    w, h = size
    if not (1 <= w <= 4096 and 1 <= h <= 2160):
        raise ValueError(f"size {size} is outside 1x1..4096x2160")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = DEFAULT_START if start is None else start
    truths: list[SceneTruth] = []
    for i in range(n):
        taken_at = start + i * interval
        image, insects = render_scene((seed, i), size, night_seed=seed)
        name = f"{taken_at:%Y%m%d-%H%M%S}.jpg"
        image.save(out_dir / name, quality=90, exif=capture_exif(taken_at).tobytes())
        truths.append(SceneTruth(name, taken_at, w, h, insects))
    write_truth(out_dir / TRUTH_FILE, seed, truths)
    return truths


def write_truth(path: Path, seed: int, truths: list[SceneTruth]) -> None:
    """Writes the truth of a night (identities too, for a tracked night) as JSON."""
    doc = {
        "seed": seed,
        "kinds": list(KINDS),
        "captures": [
            {
                "file": t.file,
                "taken_at": t.taken_at.isoformat(),
                "width": t.width,
                "height": t.height,
                "insects": [
                    {"kind": i.kind, "box": list(i.box)}
                    | ({} if i.individual is None else {"individual": i.individual})
                    for i in t.insects
                ],
            }
            for t in truths
        ],
    }
    path.write_text(json.dumps(doc, indent=1))


def load_truth(night_dir: Path) -> list[SceneTruth]:
    """Reads the ground truth that ``generate_night`` wrote into ``night_dir``."""
    doc = json.loads((night_dir / TRUTH_FILE).read_text())
    return [
        SceneTruth(
            c["file"],
            datetime.fromisoformat(c["taken_at"]),
            c["width"],
            c["height"],
            tuple(Insect(i["kind"], tuple(i["box"]), i.get("individual"))
                  for i in c["insects"]),
        )
        for c in doc["captures"]
    ]
