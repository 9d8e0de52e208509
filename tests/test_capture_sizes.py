"""Capture sizes are upright (EXIF orientation applied), as the boxes are, so exports can
normalise boxes by them: at import from the header, and corrected by the worker's decode."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from sqlalchemy import Engine, select

from db.imports import get_or_create_deployment, insert_captures
from db.models import Capture
from db.results import write_results
from db.session import make_sessionmaker
from inference.types import ItemResult
from tests.trapq_cli import trapq
from tests.worker_jobs import plan_job

ROTATED_90 = 6  # EXIF orientation: the stored pixels are shown turned by 90 degrees


def test_import_records_the_size_of_a_rotated_photo_as_it_is_shown(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine
) -> None:
    folder = tmp_path / "night"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = ROTATED_90
    Image.new("RGB", (64, 48)).save(folder / "turned.jpg", exif=exif)
    Image.new("RGB", (64, 48)).save(folder / "plain.jpg")

    done = trapq(service_env, "import", str(folder), "--deployment", "night")

    assert done.returncode == 0, done.stderr
    with clean_pg.connect() as conn:
        sizes = {Path(uri).name: (w, h) for uri, w, h in conn.execute(
            select(Capture.uri, Capture.width, Capture.height))}
    assert sizes == {"turned.jpg": (48, 64), "plain.jpg": (64, 48)}


def test_a_decoded_size_replaces_an_unknown_or_stored_one_that_differs(
    clean_pg: Engine,
) -> None:
    factory = make_sessionmaker(clean_pg)
    with factory.begin() as s:
        dep = get_or_create_deployment(s, "d")
        insert_captures(s, dep, [
            {"uri": "unknown.jpg", "captured_at": None, "width": None, "height": None},
            {"uri": "sideways.jpg", "captured_at": None, "width": 3000, "height": 4000},
            {"uri": "right.jpg", "captured_at": None, "width": 4000, "height": 3000},
        ])
        job = plan_job(s, dep, chunk_size=3).job_id
        ids = dict(s.execute(select(Capture.uri, Capture.id)).all())
    with factory.begin() as s:
        write_results(s, job, [ItemResult(cid, uri, 4000, 3000) for uri, cid in ids.items()])
    with clean_pg.connect() as conn:
        sizes = set(conn.execute(select(Capture.width, Capture.height)).all())
    assert sizes == {(4000, 3000)}
