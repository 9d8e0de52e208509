"""The error a user can fix: raised by library code (producer, importer, job store), formatted
only by the command line (tasks.cli), so a worker process never imports the CLI's libraries."""

from __future__ import annotations


class UserError(Exception):
    """What is wrong and what to do, in one line; the CLI prints it and exits 1."""
