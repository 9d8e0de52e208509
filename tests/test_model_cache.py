"""The model cache on its own (no worker): pipelines that share a detector load it once, the
least recently used pipeline not in use goes first when the bound in bytes is passed, and a
pipeline that cannot load fails with one line naming it, without touching what is held."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference.forward import BatchForward, ForwardOptions
from inference.model_cache import ModelCache, PipelineLoadError
from inference.pipeline_spec import ModelSource, PipelineSpec
from inference.registry import REGISTRY

CPU = torch.device("cpu")
SIZE = REGISTRY["demo_classifier"].input_size


def spec(labels: tuple[str, ...], weights: str = "", sha256: str | None = None) -> PipelineSpec:
    detector = ModelSource("constant_boxes", "", (), REGISTRY["constant_boxes"].input_size, None)
    classifier = ModelSource("demo_classifier", weights, labels, SIZE, sha256)
    return PipelineSpec(detector, classifier, None, 0.5, 3, "nonmoth")


def cache(bound_bytes: int) -> tuple[ModelCache, list[str]]:
    events: list[str] = []
    made = ModelCache(
        CPU, "fp32", bound_bytes, lambda p: BatchForward(p, ForwardOptions()),
        on_load=lambda e: events.append(f"load {e.name}"),
        on_evict=lambda e: events.append(f"evict {e.name}"),
    )
    return made, events


def use(c: ModelCache, s: PipelineSpec, name: str) -> None:
    with c.use(lambda: s, s.fingerprint(), name):
        pass


def test_least_recently_used_goes_first_and_a_shared_detector_loads_once() -> None:
    a, b, third = spec(("a", "x")), spec(("b", "x")), spec(("c", "x"))
    c, events = cache(0)
    use(c, a, "a")
    one = c.nbytes()
    c, events = cache(int(2.5 * one))
    use(c, a, "a")
    use(c, b, "b")
    use(c, a, "a")  # a is now the most recently used
    use(c, third, "c")
    assert events == ["load a", "load b", "load c", "evict b"]
    assert [e.name for e in c.held()] == ["c", "a"]
    held = c.held()
    assert held[0].pipeline.detector is held[1].pipeline.detector  # one detector module
    assert c.nbytes() == 2 * one and c.counts().hits == 1


def test_a_pipeline_in_use_is_not_evicted() -> None:
    a, b = spec(("a", "x")), spec(("b", "x"))
    c, _ = cache(0)
    use(c, a, "a")
    c, events = cache(c.nbytes())
    with c.use(lambda: a, a.fingerprint(), "a"):
        use(c, b, "b")
        assert {e.name for e in c.held()} == {"a"}  # b went when released, a is in use
    assert events == ["load a", "load b", "evict b"]


def test_weights_changed_after_recording_fail_with_the_pipeline_and_file(tmp_path: Path) -> None:
    weights = tmp_path / "c.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), weights)
    bad = spec(("a", "x"), str(weights), "0" * 64)
    c, events = cache(0)
    use(c, spec(("b", "x")), "b")
    with pytest.raises(PipelineLoadError) as failed:
        use(c, bad, "quebec@1")
    message = str(failed.value)
    assert message.startswith(f"pipeline quebec@1 ({bad.fingerprint()[:12]}) cannot load")
    assert f"sha256 mismatch for {weights}" in message and "\n" not in message
    with pytest.raises(PipelineLoadError, match="sha256 mismatch"):  # remembered, not retried
        use(c, bad, "quebec@1")
    assert [e.name for e in c.held()] == ["b"] and events == ["load b"]


def test_a_pipeline_bigger_than_the_bound_is_refused() -> None:
    c, _ = cache(1)
    with pytest.raises(PipelineLoadError, match="more than the model cache's bound"):
        use(c, spec(("a", "x")), "big@1")
    assert c.held() == [] and c.nbytes() == 0
