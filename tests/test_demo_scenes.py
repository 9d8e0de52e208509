"""The synthetic night generator: reproducible, real JPEGs with EXIF time, truthful boxes."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from PIL import Image

from synthetic.scenes import KINDS, TRUTH_FILE, generate_night, load_truth

SMALL = (480, 270)


def test_same_seed_gives_the_same_night_and_another_seed_another(tmp_path: Path) -> None:
    a = generate_night(tmp_path / "a", 3, seed=11, size=SMALL)
    b = generate_night(tmp_path / "b", 3, seed=11, size=SMALL)
    c = generate_night(tmp_path / "c", 3, seed=12, size=SMALL)
    assert a == b
    for t in a:
        assert (tmp_path / "a" / t.file).read_bytes() == (tmp_path / "b" / t.file).read_bytes()
    assert [t.insects for t in a] != [t.insects for t in c]


def test_a_night_is_a_prefix_of_a_longer_night(tmp_path: Path) -> None:
    short = generate_night(tmp_path / "short", 2, seed=5, size=SMALL)
    long = generate_night(tmp_path / "long", 4, seed=5, size=SMALL)
    assert long[:2] == short


def test_captures_are_jpegs_with_exif_time_and_truth_inside_the_image(tmp_path: Path) -> None:
    start = datetime(2026, 7, 1, 22, 0, 0)
    truths = generate_night(tmp_path, 4, seed=1, size=SMALL, start=start,
                            interval=timedelta(minutes=5))
    assert load_truth(tmp_path) == truths
    assert (tmp_path / TRUTH_FILE).exists()
    assert sum(len(t.insects) for t in truths) > 0
    for i, t in enumerate(truths):
        assert t.taken_at == start + i * timedelta(minutes=5)
        with Image.open(tmp_path / t.file) as im:
            assert im.format == "JPEG"
            assert im.size == SMALL == (t.width, t.height)
            stamp = im.getexif().get_ifd(0x8769)[0x9003]
        assert stamp == t.taken_at.strftime("%Y:%m:%d %H:%M:%S")
        for insect in t.insects:
            x1, y1, x2, y2 = insect.box
            assert 0 <= x1 < x2 <= t.width and 0 <= y1 < y2 <= t.height
            assert insect.kind in KINDS


def test_insects_at_full_hd_are_30_to_220_pixels_and_rarely_overlap(tmp_path: Path) -> None:
    truths = generate_night(tmp_path, 2, seed=3)
    boxes = [i.box for t in truths for i in t.insects]
    assert len(boxes) > 10
    for x1, y1, x2, y2 in boxes:
        assert 15 <= max(x2 - x1, y2 - y1) <= 220
    assert len(set(KINDS)) == len(KINDS) == 8
