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
    gpu_decodable: bool = False  # a JPEG nvJPEG decodes faithfully (see nvjpeg_decodable)

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
    return Header(width, height, fmt, orientation, fmt == "JPEG" and nvjpeg_decodable(data))


_SOF0 = 0xC0  # baseline DCT, Huffman
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG, DAC are not frames
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RSTn: no length field
_SOS = 0xDA


def nvjpeg_decodable(data: bytes) -> bool:
    """Only what the GPU decoder decodes faithfully goes to it: baseline (SOF0), 8-bit, grey or
    three-component JPEGs whose data ends with an EOI marker.

    torchvision refuses CMYK on the GPU, nvJPEG's hardware path takes baseline only, and
    truncated or corrupt data can come back from it as "success" with junk pixels
    (NVIDIA/DALI#3113); on the CPU decoder such a file fails alone, as UNDECODABLE. Only the
    markers up to the frame header are read, so this costs microseconds.
    """
    if len(data) < 4 or data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        return False
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False  # a segment must start with a marker
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            return False
        marker = data[i]
        if marker in _STANDALONE:
            i += 1
            continue
        if i + 3 > n:
            return False
        length = int.from_bytes(data[i + 1 : i + 3], "big")
        if marker in _SOF_MARKERS:
            if marker != _SOF0 or i + 9 > n:
                return False
            precision, components = data[i + 3], data[i + 8]
            return precision == 8 and components in (1, 3)
        if marker == _SOS or length < 2:
            return False  # scan data before any frame header: not a JPEG we trust
        i += 1 + length
    return False


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

    Callers send only nvjpeg_decodable files, so a batch fails rarely; when it does, each file
    is decoded alone and only the one that fails alone goes to the CPU. The orientation is
    applied here with tensor ops rather than trusted to the GPU decoder.
    """
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    decoded: list[torch.Tensor | None]
    try:
        decoded = list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        decoded = [_decode_one_on_device(t, device) for t in tensors]
    return [
        None if image is None else orient(image, header.orientation)
        for image, header in zip(decoded, headers, strict=True)
    ]


def _decode_one_on_device(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


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
