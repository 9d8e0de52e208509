"""Property tests for the geometry every capture passes through: the synthetic scenes that
benchmarks and the GPU check render at many sizes, EXIF orientation, boxes scaled back to the
original pixels, roi_align crops at image edges and of 1-pixel boxes, and the normalized boxes
of the export formats. Example-based tests pick the sizes their authors thought of; these pick
the ones that break."""

from __future__ import annotations

import functools
import io

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from db.boxes import DetectionRecord
from inference.crops import crop_and_resize
from inference.decode import decode, orient, read_header
from inference.forward import BatchForward, ForwardOptions
from inference.registry import load_pipeline, model_source
from synthetic.scenes import render_scene
from tasks.exports.common import normalized_box

EXIF_ORIENTATION = 0x0112
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    w=st.integers(8, 1400),
    h=st.integers(8, 900),
    n=st.integers(0, 15),
    scale=st.one_of(st.none(), st.floats(0.2, 3.0)),
)
def test_any_scene_renders_with_every_box_inside_the_image(
    seed: int, w: int, h: int, n: int, scale: float | None
) -> None:
    image, insects = render_scene(seed, (w, h), scale=scale, n_insects=n, night_seed=seed)
    assert image.size == (w, h) and image.mode == "RGB"
    assert len(insects) <= n
    for insect in insects:
        x1, y1, x2, y2 = insect.box
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


def test_an_insect_at_the_far_edge_gets_a_patch_and_shadow_of_one_size() -> None:
    """The case that crashed: a patch one pixel short at the image's right/bottom edge."""
    image, insects = render_scene((4242, 240), (1280, 720), night_seed=4242)
    assert image.size == (1280, 720) and insects


@FAST
@given(seed=st.integers(0, 2**32 - 1), w=st.integers(8, 600), h=st.integers(8, 400))
def test_a_scene_is_a_function_of_its_seed(seed: int, w: int, h: int) -> None:
    a, boxes_a = render_scene(seed, (w, h), n_insects=6, night_seed=seed)
    b, boxes_b = render_scene(seed, (w, h), n_insects=6, night_seed=seed)
    assert boxes_a == boxes_b
    assert a.tobytes() == b.tobytes()


def _random_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@FAST
@given(
    orientation=st.integers(1, 8),
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    seed=st.integers(0, 1000),
)
def test_orient_turns_pixels_exactly_as_pillow_exif_transpose(
    orientation: int, h: int, w: int, seed: int
) -> None:
    """The GPU path applies EXIF orientation with tensor ops; it must agree with Pillow."""
    pixels = _random_image(h, w, seed)
    im = Image.fromarray(pixels)
    im.getexif()[EXIF_ORIENTATION] = orientation
    expected = np.asarray(ImageOps.exif_transpose(im))
    got = orient(torch.from_numpy(pixels).permute(2, 0, 1), orientation).permute(1, 2, 0)
    assert got.shape == expected.shape
    assert np.array_equal(got.numpy(), expected)


@FAST
@given(orientation=st.integers(1, 8), h=st.integers(1, 40), w=st.integers(1, 40))
def test_cpu_decode_of_an_oriented_file_equals_orient_of_its_stored_pixels(
    orientation: int, h: int, w: int
) -> None:
    """A CPU decode (torchvision applies the tag) and a GPU decode (orient() applies it) of the
    same file give the same upright pixels; PNG keeps the comparison lossless."""
    pixels = _random_image(h, w, h * 41 + w)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", exif=exif.tobytes())
    data = buf.getvalue()
    header = read_header(data, max_pixels=10**6, uri="mem.png")
    assert header.orientation == orientation
    upright = decode(data, header, "mem.png")
    stored = torch.from_numpy(pixels).permute(2, 0, 1)
    assert torch.equal(upright, orient(stored, orientation))


@st.composite
def _boxes_in(draw: st.DrawFn, h: int, w: int) -> torch.Tensor:
    """Boxes anywhere in the image: at its edges, 1 px wide, or covering all of it."""
    n = draw(st.integers(1, 6))
    boxes = []
    for _ in range(n):
        x1 = draw(st.floats(0, w - 1, allow_nan=False))
        y1 = draw(st.floats(0, h - 1, allow_nan=False))
        bw = draw(st.one_of(st.just(1.0), st.floats(1.0, max(1.0, w - x1))))
        bh = draw(st.one_of(st.just(1.0), st.floats(1.0, max(1.0, h - y1))))
        boxes.append([x1, y1, min(float(w), x1 + bw), min(float(h), y1 + bh)])
    return torch.tensor(boxes, dtype=torch.float32)


@FAST
@given(data=st.data(), h=st.integers(4, 120), w=st.integers(4, 160), value=st.integers(0, 255))
def test_crops_of_a_flat_image_are_flat_wherever_the_box_lies(
    data: st.DataObject, h: int, w: int, value: int
) -> None:
    """Bilinear sampling at an image edge or inside a 1-pixel box never reads outside it."""
    image = torch.full((3, h, w), value, dtype=torch.uint8)
    boxes = data.draw(_boxes_in(h, w))
    crops = crop_and_resize(image, boxes, (8, 8))
    assert crops.shape == (boxes.shape[0], 3, 8, 8)
    assert torch.allclose(crops, torch.full_like(crops, float(value)), atol=1e-3)


@FAST
@given(data=st.data(), h=st.integers(4, 120), w=st.integers(4, 160), seed=st.integers(0, 99))
def test_windowed_cpu_crops_equal_whole_frame_crops(
    data: st.DataObject, h: int, w: int, seed: int
) -> None:
    """The CPU's window trick is an optimisation only: the same values as roi_align over the
    whole frame, for boxes up to 3x the output size (bigger ones are shrunk first)."""
    image = torch.from_numpy(_random_image(h, w, seed)).permute(2, 0, 1).contiguous()
    boxes = data.draw(_boxes_in(h, w))
    size = (24, 24)
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    small = (widths <= 3 * size[1]) & (heights <= 3 * size[0])
    boxes = boxes[small]
    if boxes.shape[0] == 0:
        return
    windowed = crop_and_resize(image, boxes, size, windowed=True)
    whole = crop_and_resize(image, boxes, size, windowed=False)
    assert torch.allclose(windowed, whole, rtol=0, atol=0.01)  # float32 rounding of offsets


@FAST
@given(
    width=st.integers(1, 8192),
    height=st.integers(1, 8192),
    box=st.tuples(*[st.floats(-50, 9000, allow_nan=False)] * 4),
)
def test_normalized_boxes_stay_in_the_unit_square_and_map_back_to_the_clipped_pixels(
    width: int, height: int, box: tuple[float, float, float, float]
) -> None:
    """Camtrap DP and MegaDetector boxes: top-left origin, fractions of the image, inside [0, 1];
    scaled back they are the pixel box clipped to the image, or None when nothing is inside."""
    x1, y1 = min(box[0], box[2]), min(box[1], box[3])
    x2, y2 = max(box[0], box[2]), max(box[1], box[3])
    record = DetectionRecord(x1=x1, y1=y1, x2=x2, y2=y2, score=0.9, label="insect")
    norm = normalized_box(record, width, height)
    cx1, cx2 = np.clip([x1, x2], 0, width)
    cy1, cy2 = np.clip([y1, y2], 0, height)
    if cx2 <= cx1 or cy2 <= cy1:
        assert norm is None
        return
    assert norm is not None
    bx, by, bw, bh = norm
    assert all(0.0 <= v <= 1.0 for v in norm) and bw > 0 and bh > 0
    assert bx + bw <= 1.0 + 1e-12 and by + bh <= 1.0 + 1e-12
    assert np.allclose([bx * width, by * height, (bx + bw) * width, (by + bh) * height],
                       [cx1, cy1, cx2, cy2], rtol=0, atol=1e-6 * max(width, height))


def test_normalized_box_of_an_image_of_unknown_size_is_none() -> None:
    record = DetectionRecord(x1=1, y1=1, x2=5, y2=5, score=0.9, label="insect")
    assert normalized_box(record, None, 100) is None and normalized_box(record, 100, 0) is None


@functools.cache
def _grid_forward() -> BatchForward:
    """The real batched forward with the constant-grid detector: 16 boxes tiling whatever image
    it is given, so the boxes that come back must tile the original image."""
    pipe = load_pipeline(
        model_source("constant_boxes", "detector"),
        model_source("demo_classifier", "classifier", random_weights=True, input_size=(8, 8)),
        device="cpu",
        box_threshold=0.0,
        detector_kwargs={"boxes": 16},
    )
    return BatchForward(pipe, ForwardOptions())


@FAST
@given(sizes=st.lists(st.tuples(st.integers(1, 2400), st.integers(1, 2400)), min_size=1,
                      max_size=3))
def test_boxes_found_on_the_resized_frame_come_back_in_the_original_pixels(
    sizes: list[tuple[int, int]]
) -> None:
    """Each frame is resized to the detector's input on the device and its boxes scaled back:
    whatever the size and aspect, and mixed in one batch, the grid covers exactly 0..W x 0..H."""
    images = [torch.zeros((3, h, w), dtype=torch.uint8) for w, h in sizes]
    boxes, _, _ = _grid_forward().detect(images)
    for (w, h), b in zip(sizes, boxes, strict=True):
        assert b.shape == (16, 4) and b.dtype == torch.float32
        assert bool((b[:, 0] >= 0).all() and (b[:, 1] >= 0).all())
        assert bool((b[:, 2] <= w).all() and (b[:, 3] <= h).all())
        assert bool((b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all())
        tol = 1e-3 * max(w, h)
        assert abs(float(b[:, 0].min())) <= tol and abs(float(b[:, 1].min())) <= tol
        assert abs(float(b[:, 2].max()) - w) <= tol and abs(float(b[:, 3].max()) - h) <= tol
        area = float(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sum())
        assert abs(area - w * h) <= 1e-3 * w * h
