"""Bad input fails alone: the corpus of tests/badinputs.py through a real worker, every case
between valid captures (scenario in tests/fault_scenarios.py, also run by bench/faults.py)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine

from tests import fault_scenarios as fs


def test_each_bad_input_ends_as_its_own_failed_item_and_the_valid_ones_around_it_are_done(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory,
) -> None:
    outcome = fs.bad_inputs(fs.Lab(clean_pg, service_env, tmp_path, worker_factory))
    report = "\n".join(outcome.lines())
    assert outcome.cases_ok == len(outcome.results), report
    assert outcome.worker_alive, report
    assert outcome.valid_done == outcome.valid, report
    assert outcome.job_state == "done", report
    a = outcome.audit
    assert (a.lost, a.duplicates, a.failed_without_reason) == (0, 0, 0), report
