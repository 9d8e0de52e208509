"""`trapq demo`: the whole job on the configured stores (embedded SQLite by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from db.status import JobStatus
from inference.taxonomy import TaxonomyError, read_taxa_list
from tasks.cli_app import app, console
from tasks.cli_app import settings as get_settings
from tasks.errors import UserError
from tasks.store import redact

ROOT = Path(__file__).resolve().parents[2]
DEMO_TAXONOMY = ROOT / "inference" / "checkpoints" / "demo_classifier_taxonomy.csv"
DEMO_TAXA = ROOT / "inference" / "checkpoints" / "demo_site_taxa.txt"


@app.command()
def demo(
    captures: Annotated[int, typer.Option(min=1, help="Captures in the synthetic night.")] = 48,
    out: Annotated[Path, typer.Option(help="Folder for captures, annotated images, CSV.")] = Path(
        "demo-out"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the night (same seed, same night).")] = 2026,
    chunk_size: Annotated[int, typer.Option(min=1, help="Captures per chunk.")] = 8,
    taxonomy: Annotated[
        Path, typer.Option(help="Taxonomy of the demo classifier's labels: answers below the "
                           "species threshold roll up it.")
    ] = DEMO_TAXONOMY,
    taxa_list: Annotated[
        Path, typer.Option(help="The demo site's taxa list: answers only among these.")
    ] = DEMO_TAXA,
    all_taxa: Annotated[
        bool, typer.Option("--all-taxa", help="No taxa list: every label may answer.")
    ] = False,
) -> None:
    """Generate a night of captures, run it through a real worker, and summarise the result."""
    from tasks.demo import run_demo

    s = get_settings()
    if not s.classifier_taxonomy:
        s = s.model_copy(update={"classifier_taxonomy": str(taxonomy)})
    try:
        taxa = None if all_taxa else read_taxa_list(taxa_list)
    except TaxonomyError as e:
        raise UserError(str(e)) from None
    console.print(
        f"job store [bold]{redact(s.database_url)}[/], broker [bold]{redact(s.broker_url)}[/]",
        highlight=False,
        soft_wrap=True,
    )
    columns = (
        TextColumn("[bold]demo job"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("", total=captures, failed=0)

        def show(st: JobStatus) -> None:
            progress.update(bar, total=st.job.n_captures, completed=st.ended, failed=st.job.failed)

        report = run_demo(s, captures, out, seed, chunk_size, show, taxa=taxa)
    table = Table(title=f"job {report.job_id}: detections and occurrences (individuals) per "
                  "answer, at the rank the evidence supports")
    table.add_column("answer")
    table.add_column("rank")
    table.add_column("detections", justify="right")
    table.add_column("occurrences", justify="right")
    table.add_column("true individuals", justify="right")
    for kind in sorted({*report.kinds, *report.occurrences, *report.individuals}):
        table.add_row(kind, report.ranks.get(kind, ""), str(report.kinds.get(kind, 0)),
                      str(report.occurrences.get(kind, 0)), str(report.individuals.get(kind, 0)))
    console.print(table)
    console.print(
        f"captures done {report.done}, failed {report.failed} of {report.captures}; "
        f"{report.images_per_s:.2f} images/s over {report.seconds:.1f} s (worker start included)",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"annotated images: {out / 'annotated'}", highlight=False, soft_wrap=True)
    console.print(f"detections CSV:   {report.csv}", highlight=False, soft_wrap=True)
    console.print(f"worker log:       {report.worker_log}", highlight=False, soft_wrap=True)
