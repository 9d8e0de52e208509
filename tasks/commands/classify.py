"""`trapq classify`: a few images through the fast lane (tasks.fast_lane), ahead of batch work."""

from __future__ import annotations

from typing import Annotated

import typer

from tasks.cli_app import app, console, err_console, settings
from tasks.errors import UserError
from tasks.fast_lane import classify_images


@app.command()
def classify(
    images: Annotated[list[str], typer.Argument(help="Image files or URLs.")],
    pipeline: Annotated[
        str | None, typer.Option(help="NAME or NAME@VERSION (`trapq pipelines`); default: "
                                 "the TRAPQ_* settings' pipeline.")
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="Wait for the results and print them.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Longest wait in seconds.")] = 300.0,
) -> None:
    """Classify a few images ahead of the batch backlog; prints the job id (and, with
    --wait, each image's boxes and labels). An image that cannot be read fails alone."""
    result = classify_images(settings(), images, pipeline=pipeline, wait=wait,
                             timeout_s=timeout)
    if result.job_id is not None:
        console.print(f"job {result.job_id}", highlight=False)
    problems = 0
    for image in result.images:
        if image.state in ("refused", "failed"):
            problems += 1
            err_console.print(f"[bold red]error:[/] {image.image}: {image.error}",
                              highlight=False, soft_wrap=True)
            continue
        if not wait:
            continue
        if image.state != "done":
            problems += 1
            err_console.print(f"{image.image}: not done within {timeout:g} s ({image.state})",
                              highlight=False, soft_wrap=True)
            continue
        console.print(f"{image.image}: {len(image.detections)} detection(s)", highlight=False,
                      soft_wrap=True)
        for box in image.detections:
            labels = ", ".join(f"{c.label} {c.score:.2f} ({c.classifier})"
                               for c in box.classifications)
            console.print(
                f"  [{box.x1:.0f}, {box.y1:.0f}, {box.x2:.0f}, {box.y2:.0f}] {box.label} "
                f"{box.score:.2f}: {labels}",
                highlight=False, soft_wrap=True,
            )
    if problems:
        raise UserError(f"{problems} of {len(images)} image(s) not classified (see above)")
