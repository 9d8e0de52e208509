"""Antenna's push API (`trapq serve`): /info, /livez, /readyz and /process, answered through
the fast lane (tasks.fast_lane), so a request becomes a small job that workers run ahead of
the batch backlog; this process never loads a model.

The API faces a network, so what a request may make trapq read is narrower than what a
worker may: an image is an http(s) URL on an allowed host (TRAPQ_ALLOWED_HOSTS), or, with no
allowed hosts set, on a public address (never loopback, private or link-local ones); a
local file only under TRAPQ_ALLOWED_ROOTS. Requests are bounded in images and bytes, and a
bearer token can be required.

Request `detections` are classified without detecting (the fast lane's given boxes); the
answer gives them back with the request's box and detection algorithm, so Antenna finds its
own detection (by image and box) and adds the classifications to it.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from db.boxes import DetectionRecord
from tasks.antenna.answers import ServedPipeline, detection, positions
from tasks.antenna.schemas import (
    POSITIONS,
    AlgorithmConfig,
    AlgorithmReference,
    DetectionRequest,
    DetectionResponse,
    PipelineRequest,
    PipelineResultsResponse,
    ProcessingServiceInfoResponse,
    SourceImage,
)
from tasks.antenna.settings import ServeSettings
from tasks.fast_lane import FastLaneResult, classify_images
from tasks.settings import Settings

READY_CACHE_S = 10.0


def refusal(url: str, settings: Settings) -> str | None:
    """Why the push API will not fetch `url`, or None."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        roots = [Path(r).resolve() for r in settings.allowed_roots]
        path = Path(url2pathname(parts.path)).resolve()
        if roots and any(path.is_relative_to(r) for r in roots):
            return None
        return "local files are served only under TRAPQ_ALLOWED_ROOTS"
    if parts.scheme not in ("http", "https") or parts.scheme not in settings.allowed_schemes:
        return f"scheme {parts.scheme or '(none)'}:// is not allowed"
    host = parts.hostname or ""
    if settings.allowed_hosts:
        return None if host in settings.allowed_hosts else f"host {host} is not allowed"
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, parts.port or 443)}
    except (socket.gaierror, UnicodeError):
        return f"host {host} does not resolve"
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global:
            return f"host {host} is an internal address ({ip})"
    return None


def info(name: str, served: Sequence[ServedPipeline]) -> ProcessingServiceInfoResponse:
    configs = [p.config() for p in served]
    algorithms: dict[str, AlgorithmConfig] = {}
    for config in configs:
        for algorithm in config.algorithms:
            algorithms.setdefault(algorithm.key, algorithm)
    return ProcessingServiceInfoResponse(
        name=name, description="trapq: batched detection and classification on a GPU pool",
        pipelines=configs, algorithms=list(algorithms.values()),
    )


def create_app(settings: Settings, serve: ServeSettings, served: Sequence[ServedPipeline],
               ready: Callable[[], str | None]) -> FastAPI:
    """`ready` returns why the pool cannot answer now, or None (cached READY_CACHE_S)."""
    app = FastAPI(title="trapq", docs_url=None, redoc_url=None)
    by_slug = {p.slug: p for p in served}
    maps = positions(served)
    token = serve.token.get_secret_value()
    checked: dict[str, tuple[float, str | None]] = {}

    @app.middleware("http")
    async def bounds(request: Request,
                     call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if token and request.url.path not in ("/livez", "/readyz"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return JSONResponse({"detail": "a bearer token is required"}, status_code=401)
        declared = request.headers.get("content-length")
        if declared is not None and int(declared or 0) > serve.max_request_bytes:
            return JSONResponse({"detail": f"request over {serve.max_request_bytes} bytes"},
                                status_code=413)
        return await call_next(request)

    @app.get("/info")
    def get_info() -> ProcessingServiceInfoResponse:
        return info(serve.name, served)

    @app.get("/livez")
    def livez() -> dict[str, str]:
        return {"status": "live"}

    @app.get("/readyz")
    def readyz() -> Response:
        now = time.monotonic()
        at, problem = checked.get("pool", (0.0, None))
        if now - at > READY_CACHE_S:
            problem = ready()
            checked["pool"] = (now, problem)
        if problem:
            return JSONResponse({"status": "not ready", "detail": problem,
                                 "pipelines": []}, status_code=503)
        return JSONResponse({"status": "ready", "pipelines": list(by_slug)})

    @app.post("/process")
    async def process(request: Request) -> Response:
        raw = await request.body()
        if len(raw) > serve.max_request_bytes:
            return JSONResponse({"detail": f"request over {serve.max_request_bytes} bytes"},
                                status_code=413)
        try:
            body = PipelineRequest.model_validate_json(raw)
        except ValidationError as e:
            return JSONResponse({"detail": e.errors(include_url=False)}, status_code=422)
        pipeline = by_slug.get(body.pipeline)
        if pipeline is None:
            raise HTTPException(422, f"unknown pipeline {body.pipeline!r}; known: "
                                     f"{', '.join(by_slug)}")
        if not 1 <= len(body.source_images) <= serve.max_images:
            raise HTTPException(422, f"send 1 to {serve.max_images} source images")
        refused = {i.url: why for i in body.source_images if (why := refusal(i.url, settings))}
        if refused:
            raise HTTPException(422, "; ".join(f"{u}: {w}" for u, w in refused.items()))
        given = given_boxes(body.source_images, body.detections or [])
        result = await run_in_threadpool(
            classify_images, settings, [i.url for i in body.source_images],
            pipeline=f"{pipeline.name}@{pipeline.version}", wait=True,
            timeout_s=serve.timeout_s,
            boxes={url: [box for box, _ in boxes] for url, boxes in given.items()},
        )
        response = answer(pipeline, body.source_images, result, given)
        return Response(response.model_dump_json(exclude_none=True,
                                                 context={POSITIONS: maps}),
                        media_type="application/json")

    return app


Given = dict[str, list[tuple[DetectionRecord, AlgorithmReference]]]


def given_boxes(images: Sequence[SourceImage], detections: Sequence[DetectionRequest]) -> Given:
    """Request detections per image URL, each with the algorithm that found it; a 422 for a
    detection of an image not sent, or with no box (a crop alone cannot be placed)."""
    urls = {i.id: i.url for i in images}
    given: Given = {}
    for d in detections:
        if d.source_image.id not in urls:
            raise HTTPException(422, f"a detection names image {d.source_image.id}, which is "
                                     "not among source_images")
        if d.bbox is None:
            raise HTTPException(422, f"a detection of image {d.source_image.id} has no bbox; "
                                     "only boxes on the source image can be classified")
        box = DetectionRecord(d.bbox.x1, d.bbox.y1, d.bbox.x2, d.bbox.y2, 1.0, d.algorithm.name)
        given.setdefault(urls[d.source_image.id], []).append((box, d.algorithm))
    return given


def answer(pipeline: ServedPipeline, images: Sequence[SourceImage], result: FastLaneResult,
           given: Given) -> PipelineResultsResponse:
    """The fast lane's result in Antenna's words (the compact form, see
    tasks.antenna.answers): images processed are listed, the others named in `errors`; a
    given box keeps the algorithm that found it."""
    now = datetime.now(UTC)
    detector = pipeline.reference("detector")
    assert detector is not None
    classifiers = pipeline.classifiers()
    listed: list[SourceImage] = []
    detections: list[DetectionResponse] = []
    errors: list[str] = []
    for image, outcome in zip(images, result.images, strict=True):
        if outcome.state != "done":
            errors.append(f"image {image.id}: {outcome.error or outcome.state}")
            continue
        listed.append(image)
        found_by = {(b.x1, b.y1, b.x2, b.y2): ref for b, ref in given.get(image.url, [])}
        detections += [
            detection(image.id, box, found_by.get((box.x1, box.y1, box.x2, box.y2), detector),
                      classifiers, now)
            for box in outcome.detections
        ]
    return PipelineResultsResponse(
        pipeline=pipeline.slug, total_time=result.seconds,
        source_images=listed, detections=detections, errors=errors or None,
    )
