"""Detections cut out of their full-resolution image on the device, straight to the classifier's
input size: one roi_align per image instead of a PIL crop, resize and copy per detection."""

from __future__ import annotations

import torch
from torchvision.ops import roi_align


def crop_and_resize(
    image: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """uint8 (3, H, W) image and (N, 4) pixel boxes -> float (N, 3, h, w) crops in 0..255.

    aligned=True puts samples at pixel centres and the adaptive sampling ratio averages every
    source pixel of a bin, so a 2x reduction equals a 2x2 average pool (area resampling).
    """
    if boxes.numel() == 0:
        return image.new_zeros((0, 3, *size), dtype=torch.float32)
    return roi_align(
        image.unsqueeze(0).float(),
        [boxes.float()],
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
