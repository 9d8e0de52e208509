"""The shipped demo weights: they load into their architectures and find and name the insects
of a night that training never saw."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.io import decode_jpeg, read_file

from synthetic.evaluate import Scores, score_image
from synthetic.scenes import KINDS, generate_night
from synthetic.train import load_models, predict

CHECKPOINTS = Path(__file__).resolve().parents[1] / "inference" / "checkpoints"
BOX_THRESHOLD = 0.5
FRESH_SEED = 90210  # training renders (seed, 7, i) and (seed, 8, i) scenes; nights are (seed, i)


def _labels(name: str) -> list[str]:
    return (CHECKPOINTS / name).read_text().split()


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.set_num_threads(2)
    return load_models(CHECKPOINTS)


def test_weights_and_label_files_agree_and_fit_the_size_budget(models) -> None:
    detector, classifier = models
    assert _labels("demo_detector_labels.txt") == ["insect"]
    assert tuple(_labels("demo_classifier_labels.txt")) == KINDS
    assert detector.head.classification_head.cls_logits.out_channels == 1
    assert classifier.fc.out_features == len(KINDS)
    weights = ("demo_detector.pt", "demo_classifier.pt")
    sizes = sum((CHECKPOINTS / n).stat().st_size for n in weights)
    assert sizes <= 20 * 1024 * 1024


@pytest.mark.heavy
def test_models_find_and_name_insects_of_a_fresh_night(models, tmp_path: Path) -> None:
    detector, classifier = models
    truths = generate_night(tmp_path, 5, seed=FRESH_SEED)
    total = Scores()
    for t in truths:
        image = decode_jpeg(read_file(str(tmp_path / t.file))).float() / 255
        boxes, kinds, _ = predict(detector, classifier, image, BOX_THRESHOLD)
        total += score_image(boxes, kinds, t.boxes, t.kinds)
    assert total.truths >= 40
    assert total.recall >= 0.9, total.summary()
    assert total.precision >= 0.9, total.summary()
    assert total.kind_accuracy >= 0.9, total.summary()
