"""Detections cut out of their full-resolution image on the device, straight to the classifier's
input size: roi_align instead of a PIL crop, resize and copy per detection."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

_MARGIN = 2  # pixels around a box that bilinear sampling at its edges can touch
_SHRINK_ABOVE = 1.5  # boxes over 3x the output size are shrunk first on a CPU
# frames up to this size are cropped a batch at once; their boxes are never big enough for the
# CPU's adaptive sampling to be slow (a 2000 px box is)
_STACK_MAX_PIXELS = 512 * 512


def crop_and_resize(
    image: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], windowed: bool | None = None
) -> torch.Tensor:
    """uint8 (3, H, W) image and (N, 4) pixel boxes -> float (N, 3, h, w) crops in 0..255.

    aligned=True puts samples at pixel centres and the adaptive sampling ratio averages every
    source pixel of a bin, so a 2x reduction equals a 2x2 average pool (area resampling).
    roi_align needs floats: on a GPU the whole frame is converted at once; on a CPU only the
    window around the boxes is (a 4K frame costs ~0.1 s to convert there). Both give the same
    values for boxes up to 3x the output size, since the window holds every pixel the sampling
    can reach; bigger boxes are shrunk first on a CPU, which differs only by resampling.
    """
    if boxes.numel() == 0:
        return torch.zeros((0, 3, *size), dtype=torch.float32, device=image.device)
    boxes = boxes.float()
    if windowed is None:
        windowed = image.device.type == "cpu"
    if not windowed:
        return _align(image.float(), boxes, size)
    coords = boxes.tolist()  # a CPU tensor: read on the host, no device to wait for
    shrinks = [min((b[2] - b[0]) / size[1], (b[3] - b[1]) / size[0]) / 2 for b in coords]
    small = [i for i, k in enumerate(shrinks) if k <= _SHRINK_ABOVE]
    if len(small) == len(coords):  # the usual case: no scatter into an output needed
        x0, y0, window = _window(image, coords, _MARGIN)
        return _align(window.float(), boxes - _offset(x0, y0, image.device), size)
    out = torch.empty((boxes.shape[0], 3, *size), dtype=torch.float32, device=image.device)
    if small:  # one roi_align for all of them: its CPU kernel runs the boxes in parallel
        x0, y0, window = _window(image, [coords[i] for i in small], _MARGIN)
        out[small] = _align(window.float(), boxes[small] - _offset(x0, y0, image.device), size)
    for i, k in enumerate(shrinks):
        if k > _SHRINK_ABOVE:
            out[i] = _shrunk_crop(image, boxes[i : i + 1], coords[i], k, size)[0]
    return out


def crop_batch(
    images: list[torch.Tensor],
    boxes: torch.Tensor,
    owners: torch.Tensor,
    spans: list[tuple[int, int]],
    size: tuple[int, int],
) -> torch.Tensor:
    """A batch's crops in box order: boxes[spans[i][0]:spans[i][1]] belong to images[i], and
    owners holds each box's image index (float, as roi_align wants it).

    Small frames of one size (thumbnails, tests, the overhead benchmark) are converted
    together and cut by one roi_align: a handful of ops for the batch instead of per frame.
    Any other batch is cropped frame by frame (crop_and_resize: windows on a CPU).
    """
    first = images[0].shape
    if all(i.shape == first for i in images) and first[-1] * first[-2] <= _STACK_MAX_PIXELS:
        if boxes.shape[0] == 0:
            return torch.zeros((0, 3, *size), dtype=torch.float32, device=boxes.device)
        frames = torch.stack(images).float()
        rois = torch.cat([owners[:, None], boxes.float()], dim=1)
        return roi_align(
            frames, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True
        )
    crops = [
        crop_and_resize(image, boxes[start:stop], size)
        for image, (start, stop) in zip(images, spans, strict=True)
    ]
    return torch.cat(crops)


def _window(
    image: torch.Tensor, coords: list[list[float]], margin: int
) -> tuple[int, int, torch.Tensor]:
    """The part of the image that boxes (host coordinates) and their margin touch."""
    h, w = image.shape[-2:]
    x0 = max(0, math.floor(min(b[0] for b in coords)) - margin)
    y0 = max(0, math.floor(min(b[1] for b in coords)) - margin)
    x1 = min(w, math.ceil(max(b[2] for b in coords)) + margin)
    y1 = min(h, math.ceil(max(b[3] for b in coords)) + margin)
    return x0, y0, image[:, y0:y1, x0:x1]


def _offset(x0: float, y0: float, device: torch.device) -> torch.Tensor:
    return torch.tensor([x0, y0, x0, y0], device=device)


def _shrunk_crop(
    image: torch.Tensor,
    box: torch.Tensor,
    coords: list[float],
    shrink: float,
    size: tuple[int, int],
) -> torch.Tensor:
    """A big box's window is first shrunk (uint8 antialiased resize, fast on a CPU) to about
    twice the output size, so that roi_align averages ~2x2 samples per bin: adaptive sampling
    of a 2000 px box straight to 224 px costs 0.4 s on a CPU."""
    x0, y0, window = _window(image, [coords], math.ceil(_MARGIN * shrink))
    wh, ww = window.shape[-2:]
    nh, nw = max(1, round(wh / shrink)), max(1, round(ww / shrink))
    window = F.interpolate(
        window.contiguous()[None], size=(nh, nw), mode="bilinear", antialias=True
    )
    scale = torch.tensor([nw / ww, nh / wh, nw / ww, nh / wh], device=image.device)
    return _align(window[0].float(), (box - _offset(x0, y0, image.device)) * scale, size)


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
    mean: Sequence[float] | torch.Tensor | None,
    std: Sequence[float] | torch.Tensor | None,
) -> torch.Tensor:
    """0..255 crops to the classifier's input distribution, channels_last for faster convs.
    Pass mean and std as tensors on the crops' device to spare a host-to-device copy."""
    x = crops / 255.0
    if mean is not None and std is not None:
        m = torch.as_tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        s = torch.as_tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last)
