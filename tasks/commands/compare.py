"""`trapq compare`: two jobs over the captures both have done, optionally against verified
labels (db/compare.py)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from inference.taxonomy import RANKS, Taxonomy
from tasks.cli_app import app, console, job_store
from tasks.errors import UserError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from db.compare import Comparison, TruthBox


@app.command()
def compare(
    job_a: Annotated[int, typer.Argument(help="First job id (the reference).")],
    job_b: Annotated[int, typer.Argument(help="Second job id.")],
    truth: Annotated[
        Path | None,
        typer.Option(help="CSV of verified labels: uri,x1,y1,x2,y2,label (box in pixels)."),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    top: Annotated[int, typer.Option(min=1, help="Label changes listed.")] = 10,
    rank: Annotated[
        str | None,
        typer.Option(help="Compare at this rank of the jobs' taxonomy (e.g. genus): every "
                     "species answer, and each verified label, as its taxon of that rank."),
    ] = None,
) -> None:
    """Compare two jobs over the captures both have done: paired detections, classifier
    agreement, the labels that changed most, per-label counts, and with --truth the precision,
    recall and accuracy of each."""
    from db.compare import compare_jobs

    if fmt not in ("table", "json"):
        raise UserError(f"--format {fmt!r}: use table or json")
    verified = read_truth(truth) if truth is not None else []
    with job_store().read() as session:
        relabel = names_at_rank(session, (job_a, job_b), rank) if rank else None
        result = compare_jobs(session, job_a, job_b, truth=verified, top_changes=top,
                              relabel=relabel)
    if fmt == "json":
        console.print_json(json.dumps(result.to_dict()))
        return
    print_comparison(result)


TRUTH_COLUMNS = ("uri", "x1", "y1", "x2", "y2", "label")


def names_at_rank(session: Session, jobs: Sequence[int], rank: str) -> dict[int, dict[str, str]]:
    """Per job, its taxonomy's taxa by their scientific name at `rank`; a job without a
    taxonomy cannot be compared at a rank, and says so."""
    from db.pipelines import job_pipelines

    if rank not in RANKS:
        raise UserError(f"--rank {rank!r}: use one of {', '.join(RANKS)}")
    out = {}
    for job, stored in job_pipelines(session, list(jobs)).items():
        if not stored.taxonomy:
            raise UserError(f"job {job} ran without a taxonomy, so --rank has nothing to roll "
                            "up to; enqueue with TRAPQ_CLASSIFIER_TAXONOMY (README: Taxonomy)")
        out[job] = Taxonomy.from_list(stored.taxonomy).names_at(rank)
    return out


def read_truth(path: Path) -> list[TruthBox]:
    """Verified boxes from a CSV with a header naming uri, x1, y1, x2, y2 and label."""
    from db.compare import TruthBox

    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in TRUTH_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(
                    f"--truth {path}: no column {', '.join(missing)}; the header must name "
                    f"{','.join(TRUTH_COLUMNS)}"
                )
            rows = []
            for line, row in enumerate(reader, start=2):
                try:
                    x1, y1, x2, y2 = (float(row[c]) for c in ("x1", "y1", "x2", "y2"))
                except (TypeError, ValueError):
                    raise UserError(
                        f"--truth {path}:{line}: the box must be four numbers"
                    ) from None
                if not row["uri"] or not row["label"]:
                    raise UserError(f"--truth {path}:{line}: uri and label must not be empty")
                rows.append(TruthBox(row["uri"], x1, y1, x2, y2, row["label"]))
    except OSError as e:
        raise UserError(f"cannot read --truth {path}: {e.strerror}") from None
    return rows


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_comparison(c: Comparison) -> None:
    console.print(
        f"job {c.job_a} (A) vs job {c.job_b} (B): {c.captures_both} captures done by both "
        f"(A {c.captures_a}, B {c.captures_b})",
        highlight=False,
    )
    dets = Table(title="detections")
    for name in ("matched", "by source", "by IoU ≥ 0.5", "only in A", "only in B"):
        dets.add_column(name, justify="right")
    dets.add_row(str(c.matched), str(c.matched_by_source), str(c.matched - c.matched_by_source),
                 str(c.only_a), str(c.only_b))
    console.print(dets)
    agree = Table(title="top-1 agreement of matched detections")
    for name, justify in (("role", "left"), ("A", "left"), ("B", "left"), ("compared", "right"),
                          ("agree", "right"), ("rate", "right")):
        agree.add_column(name, justify=justify)  # type: ignore[arg-type]
    for a in c.agreement:
        agree.add_row(a.role, a.classifier_a, a.classifier_b, str(a.compared), str(a.agree),
                      _rate(a.rate))
    console.print(agree)
    if c.changes:
        changes = Table(title="labels that changed most (A → B)")
        changes.add_column("label in A")
        changes.add_column("label in B")
        changes.add_column("detections", justify="right")
        for a, b, n in c.changes:
            changes.add_row(a, b, str(n))
        console.print(changes)
    else:
        console.print("no matched detection changed its label", highlight=False)
    counts = Table(title="detections per label")
    counts.add_column("label")
    counts.add_column("A", justify="right")
    counts.add_column("B", justify="right")
    counts.add_column("B - A", justify="right")
    for label, (a, b) in c.label_counts.items():
        counts.add_row(label, str(a), str(b), f"{b - a:+d}")
    console.print(counts)
    if c.truth:
        truth = Table(title="against the verified labels")
        for name in ("job", "captures", "truths", "found", "matched", "precision", "recall",
                     "accuracy"):
            truth.add_column(name, justify="right")
        for t in c.truth:
            truth.add_row(str(t.job_id), str(t.captures), str(t.truths), str(t.predictions),
                          str(t.matched), _rate(t.precision), _rate(t.recall), _rate(t.accuracy))
        console.print(truth)
