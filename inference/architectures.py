"""Builders of the small demo architectures that the registry names.

The demo models must train on a 2-core CPU within minutes and ship in the repository, so they
are torchvision's own detection and classification structure around very narrow convolutions.
Constructors only build modules (random weights); loading weights is the registry's step.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead

# The detector resizes inside (GeneralizedRCNNTransform): a 1920x1080 capture runs at 960x540,
# where insects of 30-200 px become 15-100 px, all within the stride-8 and stride-16 levels.
DETECTOR_MIN_SIZE = 540
DETECTOR_MAX_SIZE = 960
DETECTOR_MEAN = (0.485, 0.456, 0.406)
DETECTOR_STD = (0.229, 0.224, 0.225)
FPN_CHANNELS = 32  # a multiple of 32: FCOSHead normalises with GroupNorm(32, channels)

CLASSIFIER_INPUT_SIZE = 64
CLASSIFIER_MEAN = (0.485, 0.456, 0.406)
CLASSIFIER_STD = (0.229, 0.224, 0.225)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _tiny_backbone() -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(_conv(3, 16, 2), _conv(16, 24, 2)),  # stride 4
            s8=nn.Sequential(_conv(24, 48, 2), _conv(48, 48)),
            s16=nn.Sequential(_conv(48, 96, 2), _conv(96, 96)),
        )
    )


def tiny_detector(num_classes: int) -> FCOS:
    """FCOS on a three-stage CNN with an FPN (strides 8, 16, 32). Class indices start at 0
    (FCOS scores each class with its own sigmoid; there is no background class)."""
    backbone = BackboneWithFPN(
        _tiny_backbone(),
        return_layers={"s8": "p3", "s16": "p4"},
        in_channels_list=[48, 96],
        out_channels=FPN_CHANNELS,
    )
    anchors = AnchorGenerator(sizes=((8,), (16,), (32,)), aspect_ratios=((1.0,),) * 3)
    head = FCOSHead(FPN_CHANNELS, anchors.num_anchors_per_location()[0], num_classes, num_convs=2)
    return FCOS(
        backbone,
        num_classes,
        min_size=DETECTOR_MIN_SIZE,
        max_size=DETECTOR_MAX_SIZE,
        image_mean=list(DETECTOR_MEAN),
        image_std=list(DETECTOR_STD),
        anchor_generator=anchors,
        head=head,
        score_thresh=0.05,
        detections_per_img=200,
    )


class TinyClassifier(nn.Module):
    """Six 3x3 convolutions, global average pooling and a linear layer ``fc``."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv(3, 32, 2),
            _conv(32, 32),
            _conv(32, 64, 2),
            _conv(64, 64),
            _conv(64, 128, 2),
            _conv(128, 128),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):  # noqa: ANN001, ANN201 - nn.Module signature
        return self.fc(self.features(x))


def tiny_classifier(num_classes: int) -> TinyClassifier:
    return TinyClassifier(num_classes)
