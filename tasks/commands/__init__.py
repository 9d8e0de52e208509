"""Command modules of the `trapq` CLI, one per command group, each registering on cli_app.app."""

from tasks.commands import (  # noqa: F401
    antenna,
    classify,
    cleanup,
    compare,
    demo,
    deployments,
    dispatch,
    exports,
    jobstore,
    operate,
    pipelines,
    projects,
    reapply,
    serve,
    tracking,
)
