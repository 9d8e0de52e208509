"""Lookups that miss in the job store. db/ raises them; the command line words each once
(tasks.cli), so every command says the same thing about the same mistake."""

from __future__ import annotations


class NoSuchJob(LookupError):
    def __init__(self, job_id: int) -> None:
        super().__init__(f"no job {job_id}")
        self.job_id = job_id


class NoSuchDeployment(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown deployment {name!r}")
        self.name = name
