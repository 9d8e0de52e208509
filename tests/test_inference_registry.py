"""Checkpoints saved every usual way load, with their class count read from the file; URL weights
are downloaded once; a wrong sha256 is refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

from inference.pipeline_spec import sha256_of
from inference.registry import REGISTRY, LoadedModel, Role, load_model, load_pipeline, model_source
from inference.weights import WeightsError
from tests.inference_fixtures import http_server

torch.set_num_threads(1)
CPU = torch.device("cpu")


def load(name: str, role: Role, boxes: int | None = None, **source: Any) -> LoadedModel:
    """model_source then load_model, as load_pipeline does for each of its models."""
    kwargs = {} if boxes is None else {"boxes": boxes}
    cache_dir = source.get("cache_dir")
    return load_model(model_source(name, role, **source), role, CPU, cache_dir=cache_dir, **kwargs)


@pytest.fixture(scope="module")
def classifier_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v3_large(num_classes=7).state_dict()


def _raw(sd: dict[str, torch.Tensor]) -> object:
    return sd


def _model_state_dict(sd: dict[str, torch.Tensor]) -> object:
    return {"model_state_dict": sd, "epoch": 3, "optimizer": {}}


def _state_dict(sd: dict[str, torch.Tensor]) -> object:
    return {"state_dict": sd, "best_acc": 0.9}


def _data_parallel(sd: dict[str, torch.Tensor]) -> object:
    return {f"module.{k}": v for k, v in sd.items()}


@pytest.mark.parametrize("wrap", [_raw, _model_state_dict, _state_dict, _data_parallel])
def test_each_checkpoint_shape_loads_with_its_class_count(
    tmp_path: Path, classifier_state: dict[str, torch.Tensor], wrap: Callable[..., object]
) -> None:
    path = tmp_path / "cls.pt"
    torch.save(wrap(classifier_state), path)
    model = load("mobilenet_v3_large", "classifier", weights=str(path))
    assert model.num_classes == 7
    assert model.version == sha256_of(path)[:12]
    loaded = model.module.state_dict()
    assert torch.equal(loaded["classifier.3.weight"], classifier_state["classifier.3.weight"])


@pytest.mark.heavy
def test_torchscript_classifier_is_accepted(
    tmp_path: Path, classifier_state: dict[str, torch.Tensor]
) -> None:
    net = torchvision.models.mobilenet_v3_large(num_classes=7).eval()
    net.load_state_dict(classifier_state)
    path = tmp_path / "cls.torchscript.pt"
    x = torch.rand(2, 3, 64, 64)
    torch.jit.trace(net, x).save(str(path))
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"species {i}" for i in range(7)))
    model = load(
        "mobilenet_v3_large", "classifier", weights=str(path), labels=str(labels)
    )
    assert isinstance(model.module, torch.jit.ScriptModule)
    assert model.num_classes == 7 and model.label(6) == "species 6"
    with torch.inference_mode():
        assert torch.allclose(model.module(x), net(x), atol=1e-5)


def test_detector_class_counts_from_checkpoints(tmp_path: Path) -> None:
    frcnn = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3
    )
    torch.save({"model_state_dict": frcnn.state_dict()}, tmp_path / "frcnn.pt")
    model = load(
        "fasterrcnn_mobilenet_v3_large_320_fpn", "detector", weights=str(tmp_path / "frcnn.pt")
    )
    assert model.num_classes == 3
    ssd = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=5
    )
    torch.save(ssd.state_dict(), tmp_path / "ssd.pt")
    model = load(
        "ssdlite320_mobilenet_v3_large", "detector", weights=str(tmp_path / "ssd.pt")
    )
    assert model.num_classes == 5  # 6 anchors x 5 classes in the head's rows


def test_labels_from_text_json_list_and_json_mapping(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("background\nmoth\n\nbeetle\n")
    (tmp_path / "b.json").write_text(json.dumps(["background", "moth", "beetle"]))
    (tmp_path / "c.json").write_text(json.dumps({"2": "beetle", "0": "background", "1": "moth"}))
    for name in ("a.txt", "b.json", "c.json"):
        model = load("constant_boxes", "detector", labels=str(tmp_path / name))
        assert model.labels == ("background", "moth", "beetle")


def test_detector_labels_without_background_are_shifted(tmp_path: Path) -> None:
    (tmp_path / "l.txt").write_text("moth\n")
    model = load("constant_boxes", "detector", labels=str(tmp_path / "l.txt"))
    assert model.num_classes == 2 and model.label(1) == "moth"


def test_url_weights_are_fetched_once_then_served_from_cache(
    tmp_path: Path, classifier_state: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "w.pt"
    torch.save(classifier_state, path)
    digest = sha256_of(path)
    cache = tmp_path / "cache"
    with http_server() as server:
        server.files["w.pt"] = path.read_bytes()
        url = f"{server.base}/file/w.pt"
        for _ in range(2):
            model = load(
                "mobilenet_v3_large",
                "classifier",
                weights=url,
                sha256=digest,
                cache_dir=cache,
            )
            assert model.num_classes == 7
        assert server.hits["/file/w.pt"] == 1
    assert (cache / "sha256" / digest[:2] / digest).is_file()  # kept by its content
    assert not list((cache / "sha256").glob(".download-*"))


def test_wrong_sha256_is_refused(tmp_path: Path, classifier_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "w.pt"
    torch.save(classifier_state, path)
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        load("mobilenet_v3_large", "classifier", weights=str(path), sha256="0" * 64)


def test_checkpoint_of_another_architecture_is_refused(
    tmp_path: Path, classifier_state: dict[str, torch.Tensor]
) -> None:
    torch.save(classifier_state, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="fc.weight"):
        load("resnet50", "classifier", weights=str(tmp_path / "w.pt"))


def test_unknown_model_and_wrong_role_are_named() -> None:
    with pytest.raises(WeightsError, match="unknown model 'yolo'"):
        load("yolo", "detector", random_weights=True)
    with pytest.raises(WeightsError, match="is a classifier, not a detector"):
        load("resnet50", "detector", random_weights=True)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_model_builds_without_downloading_and_runs_on_a_tiny_input(
    name: str,
) -> None:
    spec = REGISTRY[name]
    model = load(name, spec.role, random_weights=True)
    # Models without weights (the zero-cost constant ones) are "builtin", never downloaded.
    assert model.version == ("random" if spec.num_classes_key else "builtin")
    with torch.inference_mode():
        if spec.role == "classifier":
            logits = model.module(torch.rand(2, 3, 32, 32))
            assert logits.shape == (2, model.num_classes)
            return
        transform = getattr(model.module, "transform", None)
        if transform is not None and not getattr(transform, "fixed_size", None):
            transform.min_size, transform.max_size = (64,), 96  # a tiny input stays tiny
        rpn = getattr(model.module, "rpn", None)
        if rpn is not None:  # a few proposals, not a thousand, through the box head
            rpn._pre_nms_top_n["testing"] = rpn._post_nms_top_n["testing"] = 10
        (out,) = model.module([torch.rand(3, 48, 64)])
    assert out["boxes"].shape[1:] == (4,)
    assert len(out["boxes"]) == len(out["scores"]) == len(out["labels"])


def test_pipeline_describe_names_models_versions_device_precision_and_fingerprint() -> None:
    pipeline = load_pipeline(
        model_source("constant_boxes", "detector"),
        model_source("mobilenet_v3_large", "classifier", random_weights=True),
        device="cpu",
    )
    described = pipeline.describe()
    assert described["detector"] == "constant_boxes@builtin"
    assert described["classifier"] == "mobilenet_v3_large@random"
    assert described["device"] == "cpu" and described["precision"] == "fp32"
    assert described["fingerprint"] == pipeline.spec.fingerprint()


def test_constant_boxes_gives_n_boxes_inside_each_image() -> None:
    model = load("constant_boxes", "detector", boxes=7)
    out = model.module([torch.zeros(3, 50, 80), torch.zeros(3, 120, 30)])
    for o, (h, w) in zip(out, [(50, 80), (120, 30)], strict=True):
        assert o["boxes"].shape == (7, 4)
        assert (o["boxes"][:, 2] <= w + 1e-4).all() and (o["boxes"][:, 3] <= h + 1e-4).all()


def test_demo_models_build_and_run_with_random_weights() -> None:
    pipeline = load_pipeline(
        model_source("demo_detector", "detector", random_weights=True),
        model_source("demo_classifier", "classifier", random_weights=True),
        device="cpu",
    )
    assert pipeline.classifier.entry.input_size == (64, 64)
    with torch.inference_mode():
        out = pipeline.detector.module([torch.rand(3, 60, 80)])
        logits = pipeline.classifier.module(torch.rand(2, 3, 64, 64))
    assert out[0]["boxes"].shape[1] == 4 and logits.shape == (2, 2)


@pytest.mark.parametrize("name", ["demo_detector", "demo_classifier"])
def test_demo_checkpoints_load_from_the_registry_defaults(name: str) -> None:
    spec = REGISTRY[name]
    assert Path(spec.default_weights or "").is_file(), "the demo checkpoints are committed"
    model = load(name, spec.role)
    assert model.version != "random" and model.num_classes == len(model.labels)
