"""Embeddings come from the classifying forward itself, for every detection the filter sees."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from inference.crops import crop_and_resize, normalize
from inference.forward import BatchForward, ForwardOptions
from inference.pipeline_spec import ModelSource
from inference.registry import REGISTRY, ConstantBoxes, LoadedModel, ModelEntry, Pipeline

CPU = torch.device("cpu")
SIZE = (16, 16)


class Pooled(nn.Module):
    """A classifier shaped like the registry's: features, pooling, a last linear layer `fc`.
    It counts its forwards, so a second pass for the embeddings would show."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.fc = nn.Linear(8, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(self.features(x))


class BrightIsMoth(nn.Module):
    """Filter: a crop brighter than the mean is a moth, a darker one is not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m, -m], dim=1)


def model(module: nn.Module, name: str, labels: tuple[str, ...], layer: str | None
          ) -> LoadedModel:
    spec = ModelEntry(name, "classifier", "test", SIZE, len(labels), None, embedding_layer=layer)
    return LoadedModel(module.eval(), spec, ModelSource(name, "", labels, SIZE, None),
                       len(labels))


def test_every_detection_gets_the_classifiers_penultimate_features_in_one_forward() -> None:
    image = torch.zeros((3, 64, 64), dtype=torch.uint8)
    image[:, :, 32:] = 230  # right half bright: the filter keeps those crops only
    dspec = ModelEntry("boxes", "detector", "test", (64, 64), 2, None, mean=None, std=None)
    det = LoadedModel(ConstantBoxes(boxes=4).eval(), dspec,
                      ModelSource("boxes", "", ("bg", "insect"), (64, 64), None), 2)
    cls = Pooled()
    pipe = Pipeline(CPU, det, model(cls, "species", ("a", "b", "c"), "fc"),
                    model(BrightIsMoth(), "filter", ("moth", "nonmoth"), None),
                    box_threshold=0.0)
    [found] = BatchForward(pipe, ForwardOptions(embeddings=True))([image])

    assert cls.calls == 1  # one forward over all crops classified and embedded them
    assert len(found) == 4
    kept = [d for d in found if len(d.classifications) == 2]
    rejected = [d for d in found if len(d.classifications) == 1]
    assert len(kept) == 2 and len(rejected) == 2  # the filter's negatives keep no species
    boxes = torch.tensor([[d.x1, d.y1, d.x2, d.y2] for d in found])
    x = normalize(crop_and_resize(image, boxes, SIZE), REGISTRY["resnet50"].mean,
                  REGISTRY["resnet50"].std)
    with torch.inference_mode():
        want = cls.features(x).numpy().astype(np.float16)
    for d, w in zip(found, want, strict=True):
        assert d.embedding is not None
        np.testing.assert_array_equal(np.frombuffer(d.embedding, np.float16), w)


def test_without_the_setting_or_an_embedding_layer_there_is_no_embedding() -> None:
    image = torch.full((3, 32, 32), 200, dtype=torch.uint8)
    dspec = ModelEntry("boxes", "detector", "test", (32, 32), 2, None, mean=None, std=None)
    det = LoadedModel(ConstantBoxes(boxes=2).eval(), dspec,
                      ModelSource("boxes", "", ("bg", "insect"), (32, 32), None), 2)
    for options, layer in ((ForwardOptions(), "fc"), (ForwardOptions(embeddings=True), None)):
        pipe = Pipeline(CPU, det, model(Pooled(), "species", ("a", "b", "c"), layer),
                        box_threshold=0.0)
        [found] = BatchForward(pipe, options)([image])
        assert found and all(d.embedding is None for d in found)


def test_the_registry_names_the_last_linear_layer_of_every_trained_classifier() -> None:
    """The layer whose weight rows count the classes is the last linear one; its input is the
    embedding. Classifiers without weights (zero-cost stand-ins) have none."""
    for spec in REGISTRY.values():
        if spec.role == "classifier" and spec.num_classes_key is not None:
            assert spec.num_classes_key == f"{spec.embedding_layer}.weight", spec.name


def test_a_second_forward_on_the_same_models_does_not_leak_into_the_embeddings() -> None:
    """Engines may wrap one loaded pipeline twice; the hook catches only its own forward's."""
    image = torch.full((3, 32, 32), 200, dtype=torch.uint8)
    dspec = ModelEntry("boxes", "detector", "test", (32, 32), 2, None, mean=None, std=None)
    det = LoadedModel(ConstantBoxes(boxes=2).eval(), dspec,
                      ModelSource("boxes", "", ("bg", "insect"), (32, 32), None), 2)
    pipe = Pipeline(CPU, det, model(Pooled(), "species", ("a", "b", "c"), "fc"),
                    box_threshold=0.0)
    embedding = BatchForward(pipe, ForwardOptions(embeddings=True))
    plain = BatchForward(pipe, ForwardOptions())
    plain([image])
    [first] = embedding([image])
    plain([image, image])
    [second] = embedding([image])
    assert [d.embedding for d in first] == [d.embedding for d in second]
    assert all(d.embedding is not None for d in second)
