"""`trapq dispatch`: the dispatcher on its own (compose and the Procfile run it this way)."""

from __future__ import annotations

from tasks.cli_app import app, settings
from tasks.dispatcher import main_loop


@app.command()
def dispatch() -> None:
    """Release pending chunks to the broker in fair order, keeping a shallow window there.

    Any number may run at once; `trapq worker` starts one beside its workers.
    """
    main_loop(settings())
