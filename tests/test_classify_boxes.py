"""The engine's classify-only path: items that come with boxes skip the detector, keep their
boxes, and get the classifications (and embeddings) a full run gives the same boxes, also in a
batch mixed with items that are detected."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from inference.engine import Engine, EngineConfig
from inference.forward import ForwardOptions
from inference.registry import load_pipeline, model_source
from inference.types import Detection, ItemResult, WorkItem
from synthetic.scenes import generate_night


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    pipeline = load_pipeline(
        model_source("demo_detector", "detector"),
        model_source("demo_classifier", "classifier"),
        device="cpu",
    )
    config = EngineConfig(forward=ForwardOptions(embeddings=True), batch_size=4,
                          batch_wait_ms=200)
    with Engine(pipeline, config) as running:
        yield running


def by_key(results: list[ItemResult]) -> dict[int, ItemResult]:
    return {r.key: r for r in results}


def test_given_boxes_are_classified_as_the_full_run_classified_them(
    engine: Engine, tmp_path: Path
) -> None:
    generate_night(tmp_path, n=4, seed=5150, size=(960, 540))
    paths = sorted(tmp_path.glob("*.jpg"))
    full = by_key(list(engine.run(WorkItem(i, str(p)) for i, p in enumerate(paths))))
    assert sum(len(r.detections) for r in full.values()) > 10
    given = {
        i: tuple(Detection(d.x1, d.y1, d.x2, d.y2, d.score, d.label, source=100 * i + j)
                 for j, d in enumerate(full[i].detections))
        for i in (0, 2)
    }
    # Items 0 and 2 come with boxes, 1 and 3 are detected, in the same batches.
    items = [WorkItem(i, str(p), given.get(i)) for i, p in enumerate(paths)]

    mixed = by_key(list(engine.run(items)))

    for i, result in mixed.items():
        assert result.ok and (result.width, result.height) == (960, 540)
        before = full[i].detections
        assert [(d.x1, d.y1, d.x2, d.y2, d.score, d.label) for d in result.detections] == [
            (d.x1, d.y1, d.x2, d.y2, d.score, d.label) for d in before
        ]
        assert [d.classifications[0].label for d in result.detections] == [
            d.classifications[0].label for d in before
        ]
        for new, old in zip(result.detections, before, strict=True):
            assert new.classifications[0].score == pytest.approx(old.classifications[0].score,
                                                                 abs=1e-4)
            assert new.embedding is not None and old.embedding is not None
            assert np.allclose(np.frombuffer(new.embedding, np.float16),
                               np.frombuffer(old.embedding, np.float16), atol=1e-2)
        sources = [d.source for d in result.detections]
        assert sources == ([100 * i + j for j in range(len(before))] if i in given
                           else [None] * len(before))


def test_an_item_given_no_boxes_is_done_with_none_and_never_detected(
    engine: Engine, tmp_path: Path
) -> None:
    generate_night(tmp_path, n=1, seed=5151, size=(960, 540))
    [path] = sorted(tmp_path.glob("*.jpg"))

    [result] = list(engine.run([WorkItem(7, str(path), ())]))

    assert result.ok and result.detections == [] and result.width == 960
