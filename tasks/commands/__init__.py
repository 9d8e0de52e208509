"""Command modules of the `trapq` CLI; each registers its commands on tasks.cli_app.app."""

from tasks.commands import demo, deployments, jobstore, operate, versions  # noqa: F401
