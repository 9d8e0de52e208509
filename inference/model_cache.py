"""The pipelines one device holds: loaded on first use, least recently used first out, bounded in
bytes of loaded parameters and buffers.

Models are shared between pipelines that name the same bytes (a regional classifier behind a
common detector loads the detector once): each model is counted once against the bound and
freed with the last pipeline that uses it. A pipeline in use by a running chunk is never
evicted; while all are in use the cache may run over its bound until one is released.

Each pipeline is prepared once when loaded (its batch forward built, compiled and warmed up by
the `prepare` callable the engine provides), never per chunk.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inference.forward import BatchForward
from inference.pipeline_spec import ModelSource, PipelineSpec
from inference.registry import LoadedModel, Pipeline, Role, load_model, threshold_kwargs

FAILURE_MEMO_S = 30.0  # a pipeline that failed to load fails the next chunks at once for this long
EVENT_WINDOW_S = 60.0


class PipelineLoadError(Exception):
    """A pipeline this device cannot hold; the message is one line naming it and the reason."""


@dataclass
class _Model:
    loaded: LoadedModel
    nbytes: int
    users: int = 0  # cached pipelines that hold it


@dataclass
class CachedPipeline:
    fingerprint: str
    name: str
    pipeline: Pipeline
    forward: BatchForward
    model_keys: tuple[str, ...]
    in_use: int = 0  # chunks running on it now


@dataclass(frozen=True)
class CacheCounts:
    loads: int
    evictions: int
    hits: int


@dataclass
class _Counters:
    loads: int = 0
    evictions: int = 0
    hits: int = 0
    recent: deque[tuple[float, str]] = field(default_factory=deque)  # (time, "load"/"evict")


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers: what it holds on its device."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def model_key(source: ModelSource, role: Role, kwargs: Mapping[str, Any]) -> str:
    """Two models with equal keys are the same module: same bytes, labels, size, build."""
    identity = {"role": role, **source.identity(), "build": dict(kwargs)}
    return json.dumps(identity, sort_keys=True, default=str)


class ModelCache:
    """Thread-safe; `use()` from any number of chunk threads. Loads run one at a time."""

    def __init__(
        self,
        device: torch.device,
        precision: str,
        bound_bytes: int,
        prepare: Callable[[Pipeline], BatchForward],
        *,
        weights_cache_dir: Path | None = None,
        on_load: Callable[[CachedPipeline], None] = lambda entry: None,
        on_evict: Callable[[CachedPipeline], None] = lambda entry: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device = device
        self.precision = precision
        self.bound_bytes = bound_bytes
        self._prepare = prepare
        self._weights_cache_dir = weights_cache_dir  # downloads, by sha256
        self._on_load = on_load
        self._on_evict = on_evict
        self._clock = clock
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._entries: OrderedDict[str, CachedPipeline] = OrderedDict()  # LRU first
        self._models: dict[str, _Model] = {}
        self._failed: dict[str, tuple[float, str]] = {}
        self._counters = _Counters()

    @contextmanager
    def use(self, spec_of: Callable[[], PipelineSpec], fingerprint: str, name: str
            ) -> Iterator[CachedPipeline]:
        """acquire() for the block's length."""
        entry = self.acquire(spec_of, fingerprint, name)
        try:
            yield entry
        finally:
            self.release(entry)

    def acquire(self, spec_of: Callable[[], PipelineSpec], fingerprint: str, name: str
                ) -> CachedPipeline:
        """The pipeline of this fingerprint, loaded if need be, held (never evicted) until
        release(). `spec_of` builds the spec only when a load needs it. Raises
        PipelineLoadError, the same one for FAILURE_MEMO_S after a failed load."""
        hit = self._hit(fingerprint, name)
        if hit is not None:
            return hit
        with self._load_lock:
            hit = self._hit(fingerprint, name)
            if hit is not None:
                return hit
            failed = self._failed.get(fingerprint)
            if failed is not None and self._clock() - failed[0] < FAILURE_MEMO_S:
                raise PipelineLoadError(failed[1])
            try:
                entry, evicted = self._load(spec_of(), fingerprint, name)
            except PipelineLoadError as e:
                self._failed[fingerprint] = (self._clock(), str(e))
                raise
            self._failed.pop(fingerprint, None)
        self._on_load(entry)
        self._evicted(evicted)
        return entry

    def release(self, entry: CachedPipeline) -> None:
        with self._lock:
            entry.in_use -= 1
            evicted = self._evict_over_bound()
        self._evicted(evicted)

    def adopt(self, pipeline: Pipeline, forward: BatchForward, name: str) -> CachedPipeline:
        """Take in a pipeline loaded and prepared elsewhere (the worker's start-up one)."""
        keys = []
        kwargs = threshold_kwargs(pipeline.detector.source.name, pipeline.box_threshold)
        models = [("detector", pipeline.detector, kwargs), ("classifier", pipeline.classifier, {})]
        if pipeline.filter is not None:
            models.append(("classifier", pipeline.filter, {}))
        with self._lock:
            for role, loaded, build in models:
                key = model_key(loaded.source, role, build)  # type: ignore[arg-type]
                held = self._models.setdefault(key, _Model(loaded, module_bytes(loaded.module)))
                held.users += 1
                keys.append(key)
            entry = CachedPipeline(
                pipeline.spec.fingerprint(), name, pipeline, forward, tuple(keys)
            )
            self._entries[entry.fingerprint] = entry
            self._counters.loads += 1
            self._note("load")
        self._on_load(entry)
        return entry

    def held(self) -> list[CachedPipeline]:
        """The pipelines held now, most recently used first."""
        with self._lock:
            return list(reversed(self._entries.values()))

    def nbytes(self) -> int:
        with self._lock:
            return sum(m.nbytes for m in self._models.values())

    def counts(self) -> CacheCounts:
        with self._lock:
            c = self._counters
            return CacheCounts(c.loads, c.evictions, c.hits)

    def recent(self) -> CacheCounts:
        """Loads and evictions in the last minute (hits: 0, not kept per event)."""
        with self._lock:
            self._trim()
            kinds = [kind for _, kind in self._counters.recent]
            return CacheCounts(kinds.count("load"), kinds.count("evict"), 0)

    def _hit(self, fingerprint: str, name: str) -> CachedPipeline | None:
        with self._lock:
            entry = self._entries.get(fingerprint)
            if entry is None:
                return None
            self._entries.move_to_end(fingerprint)
            entry.in_use += 1
            entry.name = name
            self._counters.hits += 1
            return entry

    def _load(
        self, spec: PipelineSpec, fingerprint: str, name: str
    ) -> tuple[CachedPipeline, list[CachedPipeline]]:
        """Loads the models not held yet, builds and prepares the pipeline, then evicts the
        least recently used pipelines past the bound. Whatever fails undoes its own loads."""
        label = f"pipeline {name} ({fingerprint[:12]})"
        if spec.fingerprint() != fingerprint:
            raise PipelineLoadError(f"{label}: its stored spec does not match its fingerprint")
        det_kwargs = threshold_kwargs(spec.detector.name, spec.box_threshold)
        wanted: list[tuple[Role, ModelSource, Mapping[str, Any]]] = [
            ("detector", spec.detector, det_kwargs),
            ("classifier", spec.classifier, {}),
        ]
        if spec.filter is not None:
            wanted.append(("classifier", spec.filter, {}))
        keys: list[str] = []
        try:
            loaded = [self._model(role, source, kwargs, keys) for role, source, kwargs in wanted]
            pipeline = Pipeline(
                self.device, loaded[0], loaded[1], loaded[2] if spec.filter else None,
                spec.box_threshold, self.precision, spec.top_k, spec.filter_negative_label,
                spec.answers,
            )
            new_bytes = sum(self._models[k].nbytes for k in set(keys))
            if self.bound_bytes and new_bytes > self.bound_bytes:
                raise PipelineLoadError(
                    f"{label} holds {new_bytes / 2**20:.0f} MiB of parameters, more than the "
                    f"model cache's bound of {self.bound_bytes / 2**20:.0f} MiB "
                    "(TRAPQ_MODEL_CACHE_MB)"
                )
            forward = self._prepare(pipeline)
        except Exception as e:
            self._release_models(keys)
            if isinstance(e, PipelineLoadError):
                raise
            detail = " ".join(str(e).split())[:300] or type(e).__name__
            raise PipelineLoadError(f"{label} cannot load: {detail}") from e
        entry = CachedPipeline(fingerprint, name, pipeline, forward, tuple(keys), in_use=1)
        with self._lock:
            self._entries[fingerprint] = entry
            self._counters.loads += 1
            self._note("load")
            evicted = self._evict_over_bound()
        return entry, evicted

    def _model(
        self, role: Role, source: ModelSource, kwargs: Mapping[str, Any], keys: list[str]
    ) -> LoadedModel:
        key = model_key(source, role, kwargs)
        with self._lock:
            held = self._models.get(key)
            if held is not None:
                held.users += 1
                keys.append(key)
                return held.loaded
        loaded = load_model(source, role, self.device, cache_dir=self._weights_cache_dir, **kwargs)
        with self._lock:
            self._models[key] = _Model(loaded, module_bytes(loaded.module), users=1)
            keys.append(key)
        return loaded

    def _release_models(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                held = self._models[key]
                held.users -= 1
                if held.users == 0:
                    del self._models[key]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _evicted(self, entries: list[CachedPipeline]) -> None:
        for entry in entries:
            self._on_evict(entry)

    def _evict_over_bound(self) -> list[CachedPipeline]:
        """Under self._lock: drops the least recently used pipelines not in use until the
        held bytes fit the bound, and returns them (their callbacks run outside the lock)."""
        evicted: list[CachedPipeline] = []
        if not self.bound_bytes:
            return evicted
        while sum(m.nbytes for m in self._models.values()) > self.bound_bytes:
            idle = next((e for e in self._entries.values() if e.in_use == 0), None)
            if idle is None:
                break
            del self._entries[idle.fingerprint]
            for key in idle.model_keys:
                held = self._models[key]
                held.users -= 1
                if held.users == 0:
                    del self._models[key]
            self._counters.evictions += 1
            self._note("evict")
            evicted.append(idle)
        if evicted and self.device.type == "cuda":
            torch.cuda.empty_cache()
        return evicted

    def _note(self, kind: str) -> None:
        self._counters.recent.append((self._clock(), kind))
        self._trim()

    def _trim(self) -> None:
        recent = self._counters.recent
        while recent and self._clock() - recent[0][0] > EVENT_WINDOW_S:
            recent.popleft()
