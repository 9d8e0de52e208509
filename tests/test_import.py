"""`trapq import`: folders, CSV manifests and URL lists become capture rows, once."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import Engine, text

from tests.trapq_cli import one_line_error, trapq

MTIME = datetime(2023, 7, 4, 23, 30, tzinfo=UTC)


def write_image(
    path: Path, fmt: str, taken: str | None = None, size: tuple[int, int] = (32, 24)
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if taken is not None:
        exif.get_ifd(Image.ExifTags.IFD.Exif)[Image.ExifTags.Base.DateTimeOriginal] = taken
    Image.new("RGB", size, (40, 80, 120)).save(path, format=fmt, exif=exif)
    os.utime(path, (MTIME.timestamp(), MTIME.timestamp()))


def captures(
    engine: Engine, deployment: str
) -> dict[str, tuple[datetime | None, int | None, int | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.uri, c.captured_at, c.width, c.height FROM captures c "
                "JOIN deployments d ON d.id = c.deployment_id WHERE d.name = :name"
            ),
            {"name": deployment},
        ).all()
    return {uri: (at, w, h) for uri, at, w, h in rows}


@pytest.fixture
def trap_folder(tmp_path: Path) -> Path:
    root = tmp_path / "night-1"
    write_image(root / "a.jpg", "JPEG", taken="2024:06:01 22:15:00", size=(64, 48))
    write_image(root / "sub" / "B.JPEG", "JPEG", taken="2024:06:01 23:00:05")
    write_image(root / "sub" / "deeper" / "c.PNG", "PNG")
    write_image(root / "d.tif", "TIFF")
    write_image(root / "e.WebP", "WEBP")
    (root / "notes.txt").write_text("not an image")
    (root / "f.gif").write_bytes(b"GIF89a")
    return root


def test_folder_import_records_every_image_below_it_with_exif_time_or_mtime(
    trap_folder: Path, service_env: dict[str, str], clean_pg: Engine
) -> None:
    result = trapq(service_env, "import", str(trap_folder), "--deployment", "night-1")

    assert result.returncode == 0, result.stderr
    assert "5 captures added, 0 already recorded" in result.stdout
    rows = captures(clean_pg, "night-1")
    assert sorted(rows) == sorted(
        str(trap_folder / p) for p in ("a.jpg", "sub/B.JPEG", "sub/deeper/c.PNG", "d.tif", "e.WebP")
    )
    assert rows[str(trap_folder / "a.jpg")] == (datetime(2024, 6, 1, 22, 15, tzinfo=UTC), 64, 48)
    assert rows[str(trap_folder / "sub/B.JPEG")][0] == datetime(2024, 6, 1, 23, 0, 5, tzinfo=UTC)
    assert rows[str(trap_folder / "sub/deeper/c.PNG")] == (MTIME, 32, 24)


def test_importing_the_same_folder_twice_adds_nothing(
    trap_folder: Path, service_env: dict[str, str], clean_pg: Engine
) -> None:
    first = trapq(service_env, "import", str(trap_folder), "--deployment", "night-1")
    write_image(trap_folder / "late.jpg", "JPEG", taken="2024:06:02 01:00:00")
    second = trapq(service_env, "import", str(trap_folder), "--deployment", "night-1")

    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "1 captures added, 5 already recorded" in second.stdout
    assert len(captures(clean_pg, "night-1")) == 6


def test_manifest_with_bad_rows_imports_the_rest_and_names_the_bad_lines(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine
) -> None:
    write_image(tmp_path / "img" / "local.jpg", "JPEG", taken="2024:06:01 20:00:00")
    manifest = tmp_path / "night.csv"
    manifest.write_text(
        "uri,captured_at\n"
        "https://example.org/trap/1.jpg,2024-06-01T21:00:00+02:00\n"
        "https://example.org/trap/2.jpg,yesterday\n"
        "img/local.jpg,\n"
        "ftp://example.org/3.jpg,2024-06-01T21:00:00\n"
        "s3://bucket/trap/4.jpg,2024-06-01 22:00:00,extra\n"
        "s3://bucket/trap/5.jpg,2024-06-01 22:30:00\n"
    )

    result = trapq(service_env, "import", str(manifest), "--deployment", "night-2")

    assert result.returncode == 1
    assert "3 captures added" in result.stdout
    for line in (3, 5, 6):
        assert f"night.csv:{line}:" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: 3 bad rows")
    rows = captures(clean_pg, "night-2")
    assert rows == {
        "https://example.org/trap/1.jpg": (datetime(2024, 6, 1, 19, 0, tzinfo=UTC), None, None),
        str(tmp_path / "img" / "local.jpg"): (datetime(2024, 6, 1, 20, 0, tzinfo=UTC), 32, 24),
        "s3://bucket/trap/5.jpg": (datetime(2024, 6, 1, 22, 30, tzinfo=UTC), None, None),
    }


def test_url_list_imports_one_capture_a_line(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine
) -> None:
    urls = tmp_path / "urls.txt"
    urls.write_text("# night 3\nhttps://example.org/a.jpg\n\nhttps://example.org/b.jpg\n")

    result = trapq(service_env, "import", str(urls), "--deployment", "night-3")

    assert result.returncode == 0, result.stderr
    assert set(captures(clean_pg, "night-3")) == {
        "https://example.org/a.jpg",
        "https://example.org/b.jpg",
    }


def test_empty_folder_is_a_one_line_error_and_creates_nothing(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine
) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")

    line = one_line_error(
        trapq(service_env, "import", str(tmp_path / "empty"), "--deployment", "nothing")
    )

    assert "no images" in line
    with clean_pg.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM deployments")).scalar() == 0
