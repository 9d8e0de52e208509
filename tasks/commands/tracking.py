"""`trapq track JOB` and `trapq occurrences JOB`: individuals, not frames."""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable
from datetime import date
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from db.errors import NoSuchJob
from db.models import Job
from db.occurrences import (
    LinkToReview,
    NightCount,
    doubtful_links,
    occurrence_counts,
    occurrence_rows,
)
from tasks.cli_app import app, console, job_store
from tasks.errors import UserError
from tasks.tracking import track_job


@app.command("track")
def track(job: Annotated[int, typer.Argument(help="Job id.")]) -> None:
    """Link the job's detections into occurrences again (replaces the job's occurrences)."""
    store = job_store()
    with store.errors():
        summary = track_job(store.sessions, job, store.settings)
    console.print(
        f"job {job}: {summary.detections} detections -> {summary.occurrences} occurrences "
        f"over {summary.nights} nights in {summary.seconds:.1f} s",
        highlight=False,
    )


@app.command("occurrences")
def occurrences(
    job: Annotated[int, typer.Argument(help="Job id.")],
    plot: Annotated[
        Path | None, typer.Option(help="Draw nightly abundance per species into this PNG.")
    ] = None,
    csv_out: Annotated[
        Path | None, typer.Option("--csv", help="Write every occurrence to this CSV file.")
    ] = None,
    doubtful: Annotated[
        int, typer.Option(min=0, help="Also list this many of the costliest links to review.")
    ] = 0,
) -> None:
    """Per night and species: occurrences (individuals) against the detections they gather."""
    with job_store().read() as session:
        row = session.get(Job, job)
        if row is None:
            raise NoSuchJob(job)
        if row.tracked_at is None:
            raise UserError(f"job {job} is not tracked yet; run `trapq track {job}`")
        counts = occurrence_counts(session, job)
        if csv_out is not None:
            n = write_occurrence_csv(csv_out, occurrence_rows(session, job))
        links = doubtful_links(session, job, doubtful) if doubtful else []
    console.print(counts_table(job, counts))
    total_o = sum(c.occurrences for c in counts)
    total_d = sum(c.detections for c in counts)
    console.print(f"{total_o} occurrences from {total_d} detections"
                  + (f" ({total_d / total_o:.1f} detections per individual)" if total_o else ""),
                  highlight=False)
    if links:
        console.print(links_table(links))
    if csv_out is not None:
        console.print(f"occurrences CSV: {csv_out} ({n} rows)", highlight=False)
    if plot is not None:
        draw_abundance(counts, plot, f"job {job}: individuals per night")
        console.print(f"abundance plot:  {plot}", highlight=False)


def counts_table(job: int, counts: list[NightCount]) -> Table:
    table = Table(title=f"job {job}: occurrences per night and species")
    table.add_column("night")
    table.add_column("species")
    table.add_column("occurrences", justify="right")
    table.add_column("detections", justify="right")
    for c in counts:
        table.add_row(c.night.isoformat(), c.label, str(c.occurrences), str(c.detections))
    return table


def links_table(links: list[LinkToReview]) -> Table:
    table = Table(title="costliest links (review these first; captures by file name)")
    for name in ("occurrence", "species", "cost", "detection", "capture", "linked from",
                 "its capture"):
        table.add_column(name, justify="right" if name == "cost" else "left")
    for k in links:
        table.add_row(str(k.occurrence_id), k.label, f"{k.cost:.3f}", str(k.detection_id),
                      k.capture.rsplit("/", 1)[-1], str(k.previous_detection_id),
                      k.previous_capture.rsplit("/", 1)[-1])
    return table


def write_occurrence_csv(path: Path, rows: Iterable[dict[str, object]]) -> int:
    n = 0
    with path.open("w", newline="") as f:
        writer: csv.DictWriter[str] | None = None
        for row in rows:
            if writer is None:
                writer = csv.DictWriter(f, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)
            n += 1
    return n


def draw_abundance(counts: list[NightCount], path: Path, title: str) -> None:
    """Nightly abundance per species as lines: what ecologists look at, not read."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'trapq[plot]'") from None
    nights = sorted({c.night for c in counts})
    by_species: dict[str, dict[date, int]] = defaultdict(dict)
    for c in counts:
        by_species[c.label][c.night] = c.occurrences
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    x = list(range(len(nights)))  # nights side by side, gaps between deployments left out
    for species in sorted(by_species, key=lambda k: -sum(by_species[k].values())):
        ax.plot(x, [by_species[species].get(n, 0) for n in nights], marker="o", label=species)
    step = max(1, len(nights) // 12)
    ax.set_xticks(x[::step], [n.isoformat() for n in nights][::step], rotation=30, ha="right")
    ax.set_xlim(-0.5, len(nights) - 0.5)
    ax.set_ylim(bottom=0)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title)
    ax.set_xlabel("night")
    ax.set_ylabel("individuals (occurrences)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
