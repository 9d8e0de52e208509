"""Tracked nights: insects that arrive, sit, shift a little, are sometimes hidden, and leave.

Tracking is only measurable against true identities. A night plan says, capture by capture,
which individuals are on the sheet, where, turned how, and whether something hides them; the
plan is cheap (no pixels), so the tracking bench can score a night of 10,000 captures at the
detection level, and ``generate_tracked_night`` renders the same plan into JPEGs with a truth
file that carries the identities (``Insect.individual``).

A plan is reproducible and streams: capture ``i`` of seed ``s`` depends only on ``s`` and the
captures before it, and only the individuals on the sheet are held.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from synthetic.scenes import (
    DEFAULT_START,
    KINDS,
    REFERENCE_WIDTH,
    TRUTH_FILE,
    Placement,
    SceneTruth,
    capture_exif,
    half_length_range,
    kind_outline,
    patch_half,
    render_placements,
    write_truth,
)


@dataclass(frozen=True)
class NightBehaviour:
    """How insects behave on the sheet; per capture probabilities unless said otherwise."""

    mean_present: float = 12.0  # individuals on the sheet at once, on average
    median_stay: float = 20.0  # captures an individual stays (log-normal, sigma stay_sigma)
    stay_sigma: float = 1.0
    p_shift: float = 0.12  # shifts a little (a quarter body length, turns a bit)
    p_walk: float = 0.02  # walks one to three body lengths away, any direction
    p_hide: float = 0.03  # hidden (under a wing, behind a fold) for 1..max_hidden captures
    max_hidden: int = 3
    initial: float = 0.0  # on the sheet at the first capture, on average (0: dusk, empty)


@dataclass(frozen=True)
class PlannedCapture:
    index: int
    taken_at: datetime
    placements: tuple[Placement, ...]  # visible individuals, drawing order
    hidden: tuple[int, ...]  # individuals on the sheet but not visible in this capture


@dataclass
class _Individual:
    ident: int
    kind: str
    r: float
    edge: float
    cx: float
    cy: float
    theta: float
    leaves_after: int  # index of its last capture
    hidden_until: int = -1  # hidden through this capture index


@dataclass
class _State:
    present: list[_Individual] = field(default_factory=list)
    next_id: int = 0


def outline_box(kind: str, cx: float, cy: float, r: float, theta: float
                ) -> tuple[float, float, float, float]:
    """The insect's box without rendering it: its body outline turned and scaled."""
    hull = kind_outline(kind)
    c, s = np.cos(theta), np.sin(theta)
    x = cx + r * (hull[:, 0] * c - hull[:, 1] * s)
    y = cy + r * (hull[:, 0] * s + hull[:, 1] * c)
    return float(x.min()), float(y.min()), float(x.max()), float(y.max())


def plan_night(seed: int, n: int, size: tuple[int, int] = (1920, 1080),
               behaviour: NightBehaviour | None = None, start: datetime | None = None,
               interval: timedelta = timedelta(minutes=1)) -> Iterator[PlannedCapture]:
    """The night's captures one by one. Species are unevenly abundant (a Dirichlet draw per
    night), as on a real sheet where a few species make most of the catch."""
    b = behaviour or NightBehaviour()
    w, h = size
    scale = w / REFERENCE_WIDTH
    rng = np.random.default_rng((seed, 16))
    abundance = rng.dirichlet(np.ones(len(KINDS)))
    mean_stay = b.median_stay * float(np.exp(b.stay_sigma**2 / 2))
    arrivals_per_capture = b.mean_present / mean_stay
    start = DEFAULT_START if start is None else start
    state = _State()
    if b.initial > 0:
        for _ in range(int(rng.poisson(b.initial))):
            state.present.append(_arrive(state, rng, b, 0, abundance, scale, w, h))
    for i in range(n):
        state.present = [p for p in state.present if p.leaves_after >= i]
        for p in state.present:
            _move(p, rng, b, i, w, h)
        for _ in range(int(rng.poisson(arrivals_per_capture))):
            state.present.append(_arrive(state, rng, b, i, abundance, scale, w, h))
        visible = [p for p in state.present if p.hidden_until < i]
        yield PlannedCapture(
            i,
            start + i * interval,
            tuple(
                Placement(p.ident, p.kind, p.cx, p.cy, p.r, p.theta, p.edge,
                          _appearance(seed, p.ident))
                for p in visible
            ),
            tuple(p.ident for p in state.present if p.hidden_until >= i),
        )


def _appearance(seed: int, ident: int) -> int:
    return int(np.random.default_rng((seed, 17, ident)).integers(2**63))


def _arrive(state: _State, rng: np.random.Generator, b: NightBehaviour, i: int,
            abundance: np.ndarray, scale: float, w: int, h: int) -> _Individual:
    kind = KINDS[int(rng.choice(len(KINDS), p=abundance))]
    r = float(rng.uniform(*half_length_range(kind))) * scale
    edge = float(rng.choice([1.0, 1.0, 1.0, 1.8])) * max(scale, 0.5)
    stay = max(1, int(round(rng.lognormal(np.log(b.median_stay), b.stay_sigma))))
    ind = _Individual(state.next_id, kind, r, edge, 0.0, 0.0, float(rng.uniform(0, 2 * np.pi)),
                      i + stay - 1)
    state.next_id += 1
    # a free spot if one of a few tries finds it; a crowded sheet gets overlaps, as real ones do
    for _ in range(10):
        ind.cx, ind.cy = _inside(ind, rng.uniform(0, w), rng.uniform(0, h), w, h)
        if all(np.hypot(ind.cx - p.cx, ind.cy - p.cy) > ind.r + p.r for p in state.present):
            break
    return ind


def _inside(ind: _Individual, cx: float, cy: float, w: int, h: int) -> tuple[float, float]:
    half = patch_half(ind.kind, ind.r, ind.edge)
    return (float(np.clip(cx, half, w - half - 1.0)), float(np.clip(cy, half, h - half - 1.0)))


def _move(p: _Individual, rng: np.random.Generator, b: NightBehaviour, i: int, w: int,
          h: int) -> None:
    u = rng.random()
    if u < b.p_walk:
        step = rng.uniform(1.0, 3.0) * 2 * p.r
        angle = rng.uniform(0, 2 * np.pi)
        p.cx, p.cy = _inside(p, p.cx + step * np.cos(angle), p.cy + step * np.sin(angle), w, h)
        p.theta = float(rng.uniform(0, 2 * np.pi))
    elif u < b.p_walk + b.p_shift:
        p.cx, p.cy = _inside(p, p.cx + rng.normal(0, 0.25 * p.r),
                             p.cy + rng.normal(0, 0.25 * p.r), w, h)
        p.theta = float(p.theta + rng.normal(0, 0.3))
    if p.hidden_until < i and rng.random() < b.p_hide:
        p.hidden_until = i + int(rng.integers(1, b.max_hidden + 1)) - 1


def generate_tracked_night(out_dir: Path, n: int, seed: int,
                           size: tuple[int, int] = (1920, 1080),
                           behaviour: NightBehaviour | None = None,
                           start: datetime | None = None,
                           interval: timedelta = timedelta(minutes=1)) -> list[SceneTruth]:
    """Renders a planned night into JPEGs (EXIF time) and a truth file with identities."""
    out_dir.mkdir(parents=True, exist_ok=True)
    w, h = size
    truths: list[SceneTruth] = []
    for cap in plan_night(seed, n, size, behaviour, start, interval):
        image, insects = render_placements((seed, cap.index), size, cap.placements, seed)
        name = f"{cap.taken_at:%Y%m%d-%H%M%S}.jpg"
        image.save(out_dir / name, quality=90, exif=capture_exif(cap.taken_at).tobytes())
        truths.append(SceneTruth(name, cap.taken_at, w, h, insects))
    write_truth(out_dir / TRUTH_FILE, seed, truths)
    return truths
