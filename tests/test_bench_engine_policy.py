"""bench/engine.py's baselines measure what they claim: the engine's precision policy, the real
class count and ~20 boxes per image, as the engine itself runs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from bench.engine import build, calibrate, dataloader, naive, resident_frames
from inference.forward import BatchForward, ForwardOptions
from tests.inference_fixtures import encode, structured_image

torch.set_num_threads(1)


def _args(detector: str, boxes: int = 20) -> argparse.Namespace:
    return argparse.Namespace(
        detector=detector, classifier="demo_classifier", boxes=boxes, classes=2, device="cpu",
        precision="bf16",
    )


def _captures(tmp_path: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(encode(structured_image(640, 360, seed=i)))
        paths.append(path)
    return paths


@pytest.mark.heavy
def test_naive_and_dataloader_baselines_run_the_detector_heads_in_float32(tmp_path: Path) -> None:
    """Under bf16 the baselines ran the whole detector under autocast: ssdlite's boxes came
    back bfloat16, decoded and NMS'd in bf16."""
    pipeline = build(_args("ssdlite320_mobilenet_v3_large"))
    seen: list[torch.dtype] = []
    pipeline.detector.module.register_forward_hook(
        lambda _m, _i, out: seen.extend(o["boxes"].dtype for o in out)
    )
    paths = _captures(tmp_path, 2)
    naive(pipeline, paths[:1])
    dataloader(pipeline, paths, batch=2, workers=0)
    assert seen == [torch.float32] * 3


@pytest.mark.heavy
def test_the_benchmark_detector_has_the_real_class_count_and_about_the_asked_boxes(
    tmp_path: Path,
) -> None:
    pipeline = build(_args("fasterrcnn_mobilenet_v3_large_320_fpn", boxes=20))
    roi_heads = pipeline.detector.module.roi_heads
    assert roi_heads.box_predictor.cls_score.out_features == 2  # moth + background, not 91
    frames = resident_frames(pipeline, _captures(tmp_path, 4))
    threshold = calibrate(pipeline, frames, 20)
    assert 0.0 < threshold == pipeline.box_threshold == roi_heads.score_thresh
    counts = [len(found) for found in BatchForward(pipeline, ForwardOptions())(frames)]
    assert 10 <= sorted(counts)[len(counts) // 2] <= 30, counts
