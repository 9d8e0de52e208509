"""`trapq export`: a job's results in the field's formats, streamed from the job store.

csv and jsonl are trapq's own flat tables; camtrapdp (a folder), megadetector and coco are
the formats of Camtrap DP tools, Timelapse/AddaxAI and training code. Every format reads the
job through db.export_rows' server-side cursors, so memory stays flat on millions of rows.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from sqlalchemy.orm import Session, sessionmaker

from db.export_rows import JobContext, job_context, job_counts
from tasks.errors import UserError
from tasks.exports.camtrapdp import check_camtrapdp, write_camtrapdp
from tasks.exports.coco import write_coco
from tasks.exports.common import ExportOptions
from tasks.exports.megadetector import write_megadetector
from tasks.exports.table import write_csv, write_jsonl

FORMATS = ("csv", "jsonl", "camtrapdp", "megadetector", "coco")
NEEDS_SIZES = ("camtrapdp", "megadetector", "coco")  # boxes normalised or images sized

__all__ = ["FORMATS", "ExportOptions", "export"]


def export(
    factory: sessionmaker[Session],
    job_id: int,
    fmt: str,
    output: Path | None,
    options: ExportOptions,
) -> str:
    """Write job JOB_ID as FMT to OUTPUT (stdout when None); returns what was written."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "camtrapdp" and output is None:
        raise UserError("--format camtrapdp writes a folder: give it with -o DIR")
    with factory() as session:
        ctx = job_context(session, job_id)
        counts = job_counts(session, job_id)
        if fmt in NEEDS_SIZES and counts.done_without_size:
            raise UserError(
                f"{counts.done_without_size} done captures of job {job_id} have no recorded "
                "image size, which normalised boxes need; run the job again to record them"
            )
        if fmt == "camtrapdp":
            assert output is not None
            check_camtrapdp(ctx, counts, options)
            return _guarded(output, lambda: write_camtrapdp(session, ctx, counts, options, output))
        with _opened(output) as out:
            return _write_file(session, ctx, fmt, options, out)


def _write_file(
    session: Session, ctx: JobContext, fmt: str, options: ExportOptions, out: TextIO
) -> str:
    if fmt == "csv":
        return f"{write_csv(session, ctx.job_id, out)} detection(s)"
    if fmt == "jsonl":
        return f"{write_jsonl(session, ctx.job_id, out)} detection(s)"
    if fmt == "megadetector":
        return write_megadetector(session, ctx, options, out)
    return write_coco(session, ctx, options, out)


@contextlib.contextmanager
def _opened(output: Path | None) -> Iterator[TextIO]:
    if output is None:
        yield sys.stdout
        return
    try:
        with output.open("w", newline="", encoding="utf-8") as out:
            yield out
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror}") from None


def _guarded(output: Path, write: Callable[[], str]) -> str:
    try:
        return write()
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror}") from None
