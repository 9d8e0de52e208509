"""`trapq antenna`: serve Antenna projects' pull-mode jobs from this job store and pool."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from typing import Annotated

import typer
from pydantic import ValidationError

from tasks.antenna.settings import AntennaSettings
from tasks.cli_app import app, job_store
from tasks.errors import UserError


@app.command()
def antenna(
    register_only: Annotated[
        bool, typer.Option("--register-only", help="Register the pipelines, then exit.")
    ] = False,
) -> None:
    """Take Antenna's tasks (TRAPQ_ANTENNA_*), run them on the pool, post the answers."""
    from tasks.antenna.bridge import Bridge
    from tasks.antenna.client import AntennaClient, AntennaUnavailable
    from tasks.antenna.served import served_pipelines

    try:
        a = AntennaSettings()
    except ValidationError as e:
        first = e.errors()[0]
        name = "TRAPQ_ANTENNA_" + ".".join(str(p) for p in first["loc"]).upper()
        raise UserError(f"bad setting {name}: {first['msg']}") from None
    if not a.url:
        raise UserError("set TRAPQ_ANTENNA_URL to the Antenna API, e.g. https://host/api/v2")
    if not a.projects:
        raise UserError("set TRAPQ_ANTENNA_PROJECTS to the Antenna project ids to serve, "
                        "e.g. [12, 18]")
    client = AntennaClient(a.url, a.secret(), timeout_s=a.timeout_s,
                           max_post_bytes=a.max_post_bytes)
    store = job_store()
    with store.errors():
        served = served_pipelines(store.settings, store.sessions, a.pipelines)
        bridge = Bridge(store.settings, a, client, store.sessions, served,
                        name=f"{socket.gethostname()}:{os.getpid()}")
        logging.basicConfig(level=logging.INFO,
                            format="[%(asctime)s: %(levelname)s/trapq antenna] %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)
        if register_only:
            try:
                bridge.register()
            except AntennaUnavailable as e:
                raise UserError(f"cannot register with Antenna: {e}") from None
            return
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        bridge.run(stop)
    client.close()
