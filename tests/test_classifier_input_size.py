"""A classifier runs at the crop size its registry entry names, or at the one set for that model:
a resnet50 trained at 128 px must not be run at 224."""

from __future__ import annotations

from collections.abc import Callable

import torch

from inference.forward import BatchForward, ForwardOptions
from inference.pipeline_spec import PipelineSpec
from inference.registry import load_pipeline, model_source
from tasks.pipeline import model_sources
from tasks.settings import Settings
from tests.inference_fixtures import chw, structured_image

torch.set_num_threads(1)


def test_the_registry_entry_gives_the_size_and_a_setting_overrides_it_per_model() -> None:
    default = model_source("resnet50", "classifier", random_weights=True)
    trained_at_128 = model_source(
        "resnet50", "classifier", random_weights=True, input_size=(128, 128)
    )
    assert default.input_size == (224, 224) and trained_at_128.input_size == (128, 128)
    detector = model_source("constant_boxes", "detector")
    specs = [PipelineSpec(detector, c, None, 0.5, 5, "nonmoth") for c in (default, trained_at_128)]
    assert specs[0].fingerprint() != specs[1].fingerprint()  # another size: another pipeline

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        classifier="resnet50",
        classifier_input_size=128,
        filter_classifier="mobilenet_v3_large",
        random_weights=True,
    )
    _, classifier, flt = model_sources(settings)
    assert classifier.input_size == (128, 128)
    assert flt is not None and flt.input_size == (224, 224)  # its own registry entry's


def test_crops_reach_the_classifier_at_its_models_input_size() -> None:
    pipe = load_pipeline(
        model_source("constant_boxes", "detector"),
        model_source("demo_classifier", "classifier", random_weights=True, input_size=(40, 40)),
        device="cpu",
        box_threshold=0.0,
    )
    shapes: list[tuple[int, ...]] = []
    pipe.classifier.module.register_forward_hook(lambda _m, i, _o: shapes.append(tuple(i[0].shape)))
    BatchForward(pipe, ForwardOptions())([chw(structured_image(320, 240, seed=0))])
    assert shapes and all(shape[1:] == (3, 40, 40) for shape in shapes)


def test_a_filter_trained_at_another_size_gets_the_crops_at_its_own() -> None:
    pipe = load_pipeline(
        model_source("constant_boxes", "detector"),
        model_source("demo_classifier", "classifier", random_weights=True, input_size=(40, 40)),
        model_source("demo_classifier", "classifier", random_weights=True, input_size=(24, 24)),
        device="cpu",
        box_threshold=0.0,
    )
    assert pipe.filter is not None
    seen: dict[str, tuple[int, ...]] = {}

    def record(role: str) -> Callable[..., None]:
        def hook(_m: object, inputs: tuple[torch.Tensor, ...], _o: object) -> None:
            seen.setdefault(role, tuple(inputs[0].shape[1:]))

        return hook

    pipe.filter.module.register_forward_hook(record("filter"))
    pipe.classifier.module.register_forward_hook(record("classifier"))
    BatchForward(pipe, ForwardOptions())([chw(structured_image(320, 240, seed=1))])
    assert seen == {"filter": (3, 24, 24), "classifier": (3, 40, 40)}
