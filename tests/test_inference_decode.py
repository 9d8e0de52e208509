"""Any mode or orientation decodes to upright 8-bit RGB; a bad file fails alone."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from inference.decode import decode, orient, read_header
from inference.types import ErrorKind, ItemFailure
from tests.inference_fixtures import chw, encode, structured_image

MAX = 10_000_000


def decoded(data: bytes) -> torch.Tensor:
    return decode(data, read_header(data, MAX, "x"), "x")


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return a.shape == b.shape and (a.float() - b.float()).abs().mean().item() <= tol


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    return structured_image(48, 32, seed=1)


def test_rgba_png_drops_alpha(picture: Image.Image) -> None:
    rgba = picture.convert("RGBA")
    rgba.putalpha(77)
    out = decoded(encode(rgba, "PNG"))
    assert out.dtype == torch.uint8 and torch.equal(out, chw(picture))


def test_16_bit_png_keeps_the_top_8_bits() -> None:
    values = (np.arange(32 * 48).reshape(32, 48) * 40).astype(np.uint16)
    out = decoded(encode(Image.fromarray(values), "PNG"))
    expected = torch.from_numpy((values >> 8).astype(np.uint8))
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 48)
    for channel in out:
        assert torch.equal(channel, expected)


def test_16_bit_tiff_through_pillow() -> None:
    values = (np.arange(32 * 48).reshape(32, 48) * 40).astype(np.uint16)
    out = decoded(encode(Image.fromarray(values), "TIFF"))
    assert out.shape == (3, 32, 48)
    assert torch.equal(out[0], torch.from_numpy((values // 257).astype(np.uint8)))


def test_grayscale_palette_and_cmyk_become_rgb(picture: Image.Image) -> None:
    gray = picture.convert("L")
    assert torch.equal(decoded(encode(gray, "PNG")), chw(gray))
    palette = picture.convert("P")
    assert torch.equal(decoded(encode(palette, "PNG")), chw(palette.convert("RGB")))
    cmyk_jpeg = encode(picture.convert("CMYK"), "JPEG", quality=95)
    reference = chw(Image.open(io.BytesIO(cmyk_jpeg)).convert("RGB"))
    assert close(decoded(cmyk_jpeg), reference, tol=3.0)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(picture: Image.Image, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(picture, "JPEG", quality=95, exif=exif.tobytes())
    upright = chw(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    out = decoded(data)
    assert out.shape == upright.shape
    assert close(out, upright, tol=2.0)
    # the GPU path applies the same tag with tensor ops
    stored = chw(Image.open(io.BytesIO(data)))
    assert torch.equal(orient(stored, orientation), upright)


@pytest.mark.parametrize("side, words", [(4000, "4000x4000"), (60000, "3600000000 pixels")])
def test_too_many_pixels_refused_from_the_header(
    picture: Image.Image, side: int, words: str
) -> None:
    """The header claims a huge frame; it is refused without allocating it."""
    data = bytearray(encode(picture, "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = side.to_bytes(2, "big") + side.to_bytes(2, "big")
    with pytest.raises(ItemFailure) as info:
        read_header(bytes(data), MAX, "bomb.jpg")
    assert info.value.kind == ErrorKind.TOO_MANY_PIXELS
    assert words in info.value.message and "bomb.jpg" in info.value.message


@pytest.mark.parametrize(
    "name, data",
    [
        ("empty", b""),
        ("text", b"this is not an image at all\n"),
    ],
)
def test_not_an_image_is_undecodable(name: str, data: bytes) -> None:
    with pytest.raises(ItemFailure) as info:
        read_header(data, MAX, name)
    assert info.value.kind == ErrorKind.UNDECODABLE


def test_truncated_jpeg_is_undecodable(picture: Image.Image) -> None:
    data = encode(picture, "JPEG")
    cut = data[: len(data) // 2]
    with pytest.raises(ItemFailure) as info:
        decode(cut, read_header(cut, MAX, "cut.jpg"), "cut.jpg")
    assert info.value.kind == ErrorKind.UNDECODABLE and "cut.jpg" in info.value.message
