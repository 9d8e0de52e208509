"""The long-running services beside the workers: `trapq dispatch` and `trapq metrics`
(compose and the Procfile start both)."""

from __future__ import annotations

from typing import Annotated

import typer

from tasks.cli_app import app, settings
from tasks.dispatcher import main_loop


@app.command()
def dispatch() -> None:
    """Release pending chunks to the broker in fair order, keeping a shallow window there.

    Any number may run at once; `trapq worker` starts one beside its workers.
    """
    main_loop(settings())


@app.command()
def metrics(
    port: Annotated[int, typer.Option(help="Port of the /metrics page.")] = 9808,
    addr: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Serve the job store's figures for Prometheus: per project and job pending, in flight,
    done, share and ETA, and the dispatcher's window (at most 5 s old)."""
    from tasks.job_store_metrics import serve

    serve(settings(), port, addr)
