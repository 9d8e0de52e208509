"""Reduced precision stops at the feature extractor: box decoding, postprocess and NMS run in
float32 for every registry detector, and TorchScript detectors run wholly in float32.

On a CPU, autocast to bfloat16 has the same dtype rules as on CUDA, so the boxes a detector hands
back under `precision="bf16"` show whether bf16 reached its heads: they must be float32 and, given
the same features, equal to the float32 run's boxes within BOX_TOLERANCE_PX.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import pytest
import torch
from torch import nn

from inference.forward import BatchForward, ForwardOptions
from inference.pipeline_spec import ModelSource
from inference.registry import (
    REGISTRY,
    LoadedModel,
    ModelEntry,
    Pipeline,
    load_pipeline,
    model_source,
)
from tests.inference_fixtures import chw, structured_image

torch.set_num_threads(1)
CPU = torch.device("cpu")
# Same features in, float32 heads: only summation order may differ between the two runs.
BOX_TOLERANCE_PX = 1e-2
DETECTORS = sorted(name for name, spec in REGISTRY.items() if spec.role == "detector")
# The big torchvision detectors' own transform resizes to 800 px; smaller keeps the test fast
# and changes nothing of where the precision boundary lies.
SMALL = {"min_size": 240, "max_size": 320}


def _pipeline(name: str) -> Pipeline:
    kwargs = SMALL if name.startswith(("fasterrcnn", "retinanet")) else {}
    torch.manual_seed(0)
    return load_pipeline(
        model_source(name, "detector", random_weights=True),
        model_source("demo_classifier", "classifier", random_weights=True),
        device="cpu",
        box_threshold=0.0,
        detector_kwargs=kwargs,
    )


def _forward(pipe: Pipeline, precision: str) -> BatchForward:
    pipe.precision = precision
    return BatchForward(pipe, ForwardOptions())


def _raw_boxes(output: Any) -> torch.Tensor:
    detections = output[1] if isinstance(output, tuple) else output
    return detections[0]["boxes"]


@pytest.mark.heavy  # every registry detector at full size, twice, bf16 emulated on a CPU
@pytest.mark.parametrize("name", DETECTORS)
def test_bf16_reaches_only_the_feature_extractor_of_every_registry_detector(name: str) -> None:
    """The bf16 run's features are fed to a float32 run: its boxes must come out the same, in
    float32, which they cannot if bf16 reached box decoding (anchors quantized to ~8 px at
    1-2k px) or NMS."""
    pipe = _pipeline(name)
    image = chw(structured_image(640, 480, seed=1))
    features: dict[str, Any] = {}
    raw: dict[str, torch.Tensor] = {}

    def run(precision: str, hold_features: bool) -> torch.Tensor:
        forward = _forward(pipe, precision)
        hooks = [forward.detector.register_forward_hook(
            lambda _m, _i, out: raw.__setitem__(precision, _raw_boxes(out))
        )]
        backbone = getattr(forward.detector, "backbone", None)
        if backbone is not None and hold_features:
            hooks.append(backbone.register_forward_hook(lambda _m, _i, _o: features["bf16"]))
        elif backbone is not None:
            hooks.append(backbone.register_forward_hook(
                lambda _m, _i, out: features.__setitem__("bf16", out)
            ))
        try:
            with torch.inference_mode():
                boxes, _, _ = forward.detect([image])
        finally:
            for hook in hooks:
                hook.remove()
        return boxes[0]

    reduced = run("bf16", hold_features=False)
    full = run("fp32", hold_features=True)
    assert raw["bf16"].dtype == torch.float32, f"{name}: bf16 reached box decoding"
    assert reduced.shape == full.shape and reduced.shape[0] > 0
    assert (reduced - full).abs().max().item() <= BOX_TOLERANCE_PX
    if name != "constant_boxes":
        assert features["bf16"], f"{name}: no features seen from its backbone"
        for value in OrderedDict(features["bf16"]).values():
            assert value.dtype == torch.float32  # the heads get float32 features


class ScriptedBoxes(nn.Module):
    """A detector whose boxes come from a matmul, as a box regression's do: under bf16 autocast
    their coordinates (~1,500 px) would be rounded to multiples of 8."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.regress = nn.Linear(3, 4)
        with torch.no_grad():
            self.regress.weight.uniform_(0, 300.0)
            self.regress.bias.fill_(1000.0)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out: list[dict[str, torch.Tensor]] = []
        for image in images:
            boxes = self.regress(image.mean(dim=(1, 2)).unsqueeze(0)).sort(dim=1).values
            out.append({"boxes": boxes, "scores": torch.ones(1), "labels": torch.ones(1).long()})
        return out


def test_torchscript_detectors_run_wholly_in_float32() -> None:
    module = torch.jit.script(ScriptedBoxes().eval())
    spec = ModelEntry("scripted", "detector", "test", (2048, 2048), 2, None, mean=None, std=None)
    source = ModelSource("scripted", "", ("background", "insect"), spec.input_size, None)
    detector = LoadedModel(module, spec, source, 2)
    pipe = Pipeline(CPU, detector, _pipeline("constant_boxes").classifier, box_threshold=0.0)
    image = chw(structured_image(2048, 2048, seed=2))
    with torch.inference_mode():
        reduced = _forward(pipe, "bf16").detect([image])[0][0]
        full = _forward(pipe, "fp32").detect([image])[0][0]
    assert reduced.max() > 1000  # where bf16 would round to multiples of 8
    assert torch.equal(reduced, full)


def test_an_outer_autocast_does_not_reach_the_detector_heads() -> None:
    """Callers (benchmarks, a user's own loop) may call the forward under autocast; the heads
    still run in float32."""
    pipe = _pipeline("ssdlite320_mobilenet_v3_large")
    forward = _forward(pipe, "fp32")
    seen: list[torch.dtype] = []
    hook = forward.detector.register_forward_hook(
        lambda _m, _i, o: seen.append(_raw_boxes(o).dtype)
    )
    image = chw(structured_image(320, 320, seed=3))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        forward.detect([image])
    hook.remove()
    assert seen == [torch.float32]
