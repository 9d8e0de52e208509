"""Command modules of the `trapq` CLI; each registers its commands on tasks.cli_app.app."""

from tasks.commands import (  # noqa: F401
    demo,
    deployments,
    exports,
    jobstore,
    operate,
    tracking,
    versions,
)
