"""Encoded bytes to an 8-bit RGB CHW tensor, upright, whatever the file's mode or orientation.

The header is read first (Pillow parses only the markers) so that a decompression bomb is
refused before any pixel buffer is allocated. JPEG, PNG and WebP go through torchvision.io
(libjpeg-turbo, libpng, libwebp); other formats (TIFF, BMP, ...) through Pillow.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from inference.types import ErrorKind, ItemFailure

TORCHVISION_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Header:
    width: int  # as stored, before EXIF orientation
    height: int
    format: str
    orientation: int  # EXIF orientation tag, 1 when absent

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decoded_bytes(self) -> int:
        return self.pixels * 3


def read_header(data: bytes, max_pixels: int, uri: str) -> Header:
    if not data:
        raise ItemFailure(ErrorKind.UNDECODABLE, f"empty file (0 bytes): {uri}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            fmt = im.format or "?"
            orientation = _orientation(im)
    except Image.DecompressionBombError as e:
        raise ItemFailure(ErrorKind.TOO_MANY_PIXELS, f"{_first_line(e)}: {uri}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ItemFailure(
            ErrorKind.UNDECODABLE, f"not an image ({len(data)} bytes, unknown format): {uri}"
        ) from None
    if width * height > max_pixels:
        raise ItemFailure(
            ErrorKind.TOO_MANY_PIXELS,
            f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels}: {uri}",
        )
    return Header(width, height, fmt, orientation)


def decode(data: bytes, header: Header, uri: str) -> torch.Tensor:
    """Decode on the CPU to uint8 (3, H, W), EXIF orientation applied."""
    try:
        if header.format in TORCHVISION_FORMATS:
            image = decode_image(
                torch.frombuffer(bytearray(data), dtype=torch.uint8),
                mode=ImageReadMode.RGB,
                apply_exif_orientation=True,
            )
            return to_uint8(image)
        return _decode_pillow(data)
    except (RuntimeError, OSError, ValueError, SyntaxError) as e:
        raise ItemFailure(
            ErrorKind.UNDECODABLE, f"cannot decode {header.format} ({_first_line(e)}): {uri}"
        ) from None


def decode_jpegs_on_device(
    datas: Sequence[bytes], headers: Sequence[Header], device: torch.device
) -> list[torch.Tensor | None]:
    """Batch-decode JPEGs with nvJPEG; None where the GPU decoder refused one (decode it on CPU).

    The orientation is applied here with tensor ops rather than trusted to the GPU decoder.
    """
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        decoded: list[torch.Tensor | None] = list(
            decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        )
    except RuntimeError:
        decoded = []
        for t in tensors:
            try:
                decoded.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
    return [
        None if image is None else orient(image, header.orientation)
        for image, header in zip(decoded, headers, strict=True)
    ]


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation tag to a (C, H, W) tensor, as Pillow's exif_transpose does."""
    if orientation == 2:
        return image.flip(2)
    if orientation == 3:
        return image.flip(1, 2)
    if orientation == 4:
        return image.flip(1)
    if orientation == 5:
        return image.transpose(1, 2)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(1, 2))
    if orientation == 7:
        return image.transpose(1, 2).flip(1, 2)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(1, 2))
    return image


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """16-bit decodes keep their top 8 bits."""
    if image.dtype == torch.uint8:
        return image
    return (image.to(torch.int32) >> 8).to(torch.uint8)


def _decode_pillow(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I;16") or im.mode == "I":
            array = np.asarray(im).astype(np.int64)
            scale = 257 if im.mode.startswith("I;16") or array.max() > 255 else 1
            im = Image.fromarray((array // scale).clip(0, 255).astype(np.uint8), "L")
        elif im.mode == "F":
            im = Image.fromarray(np.asarray(im).clip(0, 255).astype(np.uint8), "L")
        rgb = np.asarray(im.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block must not make a readable image undecodable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[-1][:200] if text else type(e).__name__
