"""`trapq serve`: Antenna's push API (/info, /livez, /readyz, /process) on the fast lane."""

from __future__ import annotations

from typing import Annotated

import typer

from tasks.cli_app import app, job_store


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for every one.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 2000,
) -> None:
    """Answer Antenna's push API through the fast lane (TRAPQ_SERVE_* settings)."""
    import uvicorn
    from kombu.exceptions import KombuError
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from tasks.antenna.served import served_pipelines
    from tasks.antenna.service import create_app
    from tasks.antenna.settings import ServeSettings
    from tasks.dispatcher import live_slots
    from tasks.producer import producer_app

    store = job_store()
    s, factory = store.settings, store.sessions
    broker = producer_app(s)

    def ready() -> str | None:
        try:
            with factory() as session:
                session.execute(text("SELECT 1"))
        except SQLAlchemyError:
            return "the job store does not answer"
        try:
            slots = live_slots(broker, s.queue)
        except (KombuError, OSError) as e:
            return f"the broker does not answer ({type(e).__name__})"
        return None if slots else f"no worker consumes the queue {s.queue}"

    serve_settings = ServeSettings()
    served = served_pipelines(s, factory, serve_settings.pipelines)
    service = create_app(s, serve_settings, served, ready)
    uvicorn.run(service, host=host, port=port, log_level="info")
