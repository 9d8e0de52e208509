"""`trapq import`: turn a folder, a CSV manifest or a list of URLs into capture rows.

Rows stream into db.imports in batches, so a manifest of millions never sits in memory.
captured_at comes from the manifest, else the image's EXIF DateTimeOriginal, else the file's
mtime; the EXIF and the pixel size come from the image header only (Pillow opens lazily).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from PIL import ExifTags, Image

from db.imports import CaptureRow, get_or_create_deployment, insert_captures
from tasks.errors import UserError
from tasks.settings import Settings
from tasks.store import database_errors, ready_session_factory
from tasks.timestamps import parse_timestamp

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"})
EXIF_DATETIME_ORIGINAL = ExifTags.Base.DateTimeOriginal
EXIF_OFFSET_TIME_ORIGINAL = ExifTags.Base.OffsetTimeOriginal
EXIF_ORIENTATION = ExifTags.Base.Orientation
TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # rotated by 90 degrees one way or the other


@dataclass(frozen=True)
class BadRow:
    line: int
    reason: str


@dataclass
class ImportReport:
    deployment: str
    added: int = 0
    skipped: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)


def import_source(
    settings: Settings,
    source: str,
    deployment: str,
    on_bad_row: Callable[[BadRow], None] | None = None,
    pattern: str | None = None,
) -> ImportReport:
    """Record the captures of SOURCE under DEPLOYMENT (created if new), in one transaction.

    SOURCE is a folder, a manifest, a URL list or an s3://bucket/prefix; `pattern` (a regular
    expression searched in each object's key) narrows an S3 listing.
    """
    report = ImportReport(deployment=deployment)

    def bad(row: BadRow) -> None:
        report.bad_rows.append(row)
        if on_bad_row is not None:
            on_bad_row(row)

    rows: Iterator[CaptureRow]
    if source.startswith("s3://"):
        if "s3" not in settings.allowed_schemes:
            raise UserError("s3:// is not in TRAPQ_ALLOWED_SCHEMES; add it to import from S3")
        from tasks.s3_store import s3_rows  # boto3 is the optional [s3] extra

        rows = s3_rows(settings, source, pattern, IMAGE_SUFFIXES)
    elif pattern is not None:
        raise UserError("--pattern filters the keys of an s3:// listing; folders take every image")
    else:
        rows = read_source(Path(source), settings.allowed_schemes, bad)
    factory = ready_session_factory(settings)
    with database_errors(settings), factory.begin() as session:
        deployment_id = get_or_create_deployment(session, deployment)
        counts = insert_captures(session, deployment_id, rows)
        if counts.added + counts.skipped == 0 and not report.bad_rows:
            raise UserError(f"no captures found in {source}")  # rolls the deployment back
    report.added, report.skipped = counts.added, counts.skipped
    return report


def read_source(
    source: Path, allowed_schemes: list[str], bad: Callable[[BadRow], None]
) -> Iterator[CaptureRow]:
    if source.is_dir():
        return walk_folder(source)
    if not source.is_file():
        raise UserError(f"{source} is neither a folder nor a file")
    if source.suffix.lower() == ".csv":
        return read_manifest(source, allowed_schemes, bad)
    return read_url_list(source, allowed_schemes, bad)


def walk_folder(folder: Path) -> Iterator[CaptureRow]:
    """Every image file below folder (recursive, suffix case-insensitive), in path order."""
    found = False
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found = True
                yield local_row(Path(os.path.abspath(Path(root, name))))
    if not found:
        kinds = "/".join(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
        raise UserError(f"no images ({kinds}) under {folder}")


def read_manifest(
    path: Path, allowed_schemes: list[str], bad: Callable[[BadRow], None]
) -> Iterator[CaptureRow]:
    """CSV rows `uri[,captured_at]`, with an optional header row naming those columns."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        columns = {"uri": 0, "captured_at": 1}
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            if reader.line_num == 1 and cells[0].strip().lower() == "uri":
                columns = {c.strip().lower(): i for i, c in enumerate(cells)}
                continue
            if len(cells) > len(columns):
                bad(BadRow(reader.line_num, f"expected uri[,captured_at], got {len(cells)} fields"))
                continue
            at_column = columns.get("captured_at", len(cells))
            at = cells[at_column] if at_column < len(cells) else ""
            try:
                yield manifest_row(cells[columns["uri"]], at, path.parent, allowed_schemes)
            except ValueError as e:
                bad(BadRow(reader.line_num, str(e)))


def read_url_list(
    path: Path, allowed_schemes: list[str], bad: Callable[[BadRow], None]
) -> Iterator[CaptureRow]:
    """One URI or path a line; blank lines and lines starting with # are skipped."""
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                yield manifest_row(text, "", path.parent, allowed_schemes)
            except ValueError as e:
                bad(BadRow(number, str(e)))


def manifest_row(uri: str, captured_at: str, base: Path, allowed_schemes: list[str]) -> CaptureRow:
    """A row of a manifest or URL list; relative paths are taken from the manifest's folder."""
    uri = uri.strip()
    if not uri:
        raise ValueError("empty uri")
    given_time = bool(captured_at.strip())
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if len(scheme) > 1:  # a one-letter "scheme" is a Windows drive letter
        if scheme not in allowed_schemes:
            raise ValueError(f"scheme {scheme!r} of {uri!r} is not in TRAPQ_ALLOWED_SCHEMES")
        local = Path(parts.path) if scheme == "file" else None
    else:
        local = Path(os.path.abspath(base / uri))
        uri = str(local)
    if local is not None and not given_time:
        row = local_row(local, uri=uri)
    else:
        row = CaptureRow(uri=uri, captured_at=None, width=None, height=None)
    if given_time:
        row["captured_at"] = parse_timestamp(captured_at)
    return row


def local_row(path: Path, uri: str | None = None) -> CaptureRow:
    """A local file's row: time and size from its header if readable, else its mtime."""
    row = CaptureRow(uri=uri or str(path), captured_at=None, width=None, height=None)
    try:
        with Image.open(path) as im:
            row["width"], row["height"] = upright_size(im)
            row["captured_at"] = exif_time(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        pass  # not readable here: the worker records why, if it cannot read it either
    if row["captured_at"] is None:
        try:
            row["captured_at"] = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        except OSError:
            pass  # e.g. on a share mounted only on the workers
    return row


def upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) once EXIF orientation is applied, as workers decode it and boxes lie."""
    width, height = im.size
    if im.getexif().get(EXIF_ORIENTATION) in TRANSPOSED_ORIENTATIONS:
        return height, width
    return width, height


def exif_time(im: Image.Image) -> datetime | None:
    """EXIF DateTimeOriginal, shifted by OffsetTimeOriginal when the camera wrote one."""
    exif = im.getexif().get_ifd(ExifTags.IFD.Exif)
    raw = exif.get(EXIF_DATETIME_ORIGINAL)
    if not isinstance(raw, str):
        return None
    try:
        taken = datetime.strptime(raw.strip("\x00 "), "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    offset = exif.get(EXIF_OFFSET_TIME_ORIGINAL)
    if isinstance(offset, str) and len(offset) >= 6 and offset[0] in "+-":
        try:
            hours, minutes = int(offset[1:3]), int(offset[4:6])
        except ValueError:
            return taken.replace(tzinfo=UTC)
        sign = 1 if offset[0] == "+" else -1
        return (taken - sign * timedelta(hours=hours, minutes=minutes)).replace(tzinfo=UTC)
    return taken.replace(tzinfo=UTC)
