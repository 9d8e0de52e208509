"""Detections cut out of their full-resolution image on the device, straight to the classifier's
input size: roi_align instead of a PIL crop, resize and copy per detection."""

from __future__ import annotations

import math

import torch
from torchvision.ops import roi_align

_MARGIN = 2  # pixels around a box that bilinear sampling at its edges can touch


def crop_and_resize(
    image: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], windowed: bool | None = None
) -> torch.Tensor:
    """uint8 (3, H, W) image and (N, 4) pixel boxes -> float (N, 3, h, w) crops in 0..255.

    aligned=True puts samples at pixel centres and the adaptive sampling ratio averages every
    source pixel of a bin, so a 2x reduction equals a 2x2 average pool (area resampling).
    roi_align needs floats: on a GPU the whole frame is converted at once; on a CPU only a
    window around each box is (a 4K frame costs ~0.1 s to convert there). Both give the same
    values, since the window holds every pixel the sampling can reach.
    """
    if boxes.numel() == 0:
        return torch.zeros((0, 3, *size), dtype=torch.float32, device=image.device)
    boxes = boxes.float()
    if windowed is None:
        windowed = image.device.type == "cpu"
    if not windowed:
        return _align(image.float(), boxes, size)
    h, w = image.shape[-2:]
    crops = []
    for box in boxes.tolist():
        x0 = max(0, math.floor(box[0]) - _MARGIN)
        y0 = max(0, math.floor(box[1]) - _MARGIN)
        x1 = min(w, math.ceil(box[2]) + _MARGIN)
        y1 = min(h, math.ceil(box[3]) + _MARGIN)
        window = image[:, y0:y1, x0:x1].float()
        shifted = torch.tensor([[box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0]])
        crops.append(_align(window, shifted.to(image.device), size))
    return torch.cat(crops)


def _align(image: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return roi_align(
        image.unsqueeze(0),
        [boxes],
        output_size=size,
        spatial_scale=1.0,
        sampling_ratio=-1,
        aligned=True,
    )


def normalize(
    crops: torch.Tensor,
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
) -> torch.Tensor:
    """0..255 crops to the classifier's input distribution, channels_last for faster convs."""
    x = crops / 255.0
    if mean is not None and std is not None:
        m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last)
