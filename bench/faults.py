"""Fault and bad-input figures: the scenarios of tests/test_faults.py and
tests/test_bad_inputs_worker.py (tests/fault_scenarios.py), run once and printed together.

Uses a fresh temporary PostgreSQL database and fresh queue names, removed afterwards; every
worker and redis-server it starts is killed when it ends. No timing is asserted: the figures
are counts (trials that hit a chunk mid-way, duplicate rows, lost work items, corpus cases
that ended as expected).

    .venv/bin/python -m bench.faults [--trials N] [--only NAME ...]

Environment: TRAPQ_TEST_PG_URL (an admin URL, default postgres@127.0.0.1/test) and
TRAPQ_TEST_REDIS_URL (default redis://127.0.0.1:6379/1), as the tests use.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # `python bench/faults.py` runs as `python -m bench.faults` would
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import signal
import tempfile
import time
import traceback
from collections.abc import Callable

from sqlalchemy import Engine

from db.session import make_engine
from tests import fault_scenarios as fs
from tests.services import REDIS_URL, service_env, temporary_database, temporary_queue
from tests.worker_process import WorkerProcess

RUNNERS: dict[str, Callable[[fs.Lab, int], fs.Outcome | fs.BadInputOutcome]] = {
    "sigkill_restart": lambda lab, trials: fs.sigkill_restart(lab, trials=trials),
    "redis_restart": lambda lab, _: fs.redis_restart(lab),
    "redis_killed": lambda lab, _: fs.redis_restart(lab, sig=signal.SIGKILL),
    "redis_data_lost": lambda lab, _: fs.redis_data_lost(lab),
    "pg_terminate": lambda lab, _: fs.pg_terminate(lab),
    "sigterm_warm": lambda lab, _: fs.sigterm_warm(lab),
    "bad_inputs": lambda lab, _: fs.bad_inputs(lab),
    "supervisor_kill": lambda lab, _: fs.supervisor_kill(lab),
    "stall": lambda lab, _: fs.stall(lab),
    "redelivery": lambda lab, _: fs.redelivery(lab),
    "partition": lambda lab, _: fs.partition(lab),
}
SCENARIOS = tuple(RUNNERS)
# What a scenario gave: its outcome, why it could not run here, or None when it broke.
Ran = fs.Outcome | fs.BadInputOutcome | fs.Unavailable | None
# Scenario figures that go into the RESULT line (Outcome.counts), beside the audits' totals.
RESULT_FIGURES = ("orphans", "orphan_exit_ms", "stall_beat_gap_ms", "stall_deadline_ms",
                  "redelivery_ms", "redelivery_bound_ms", "partition_recovery_ms",
                  "partition_late_writes_refused")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10, help="SIGKILLs over the one job")
    ap.add_argument("--only", nargs="*", choices=SCENARIOS, default=list(SCENARIOS))
    args = ap.parse_args()

    outcomes: dict[str, Ran] = {}
    with (
        temporary_database("trapq_bench") as db_url,
        tempfile.TemporaryDirectory(prefix="trapq-faults-") as tmp_dir,
    ):
        engine = make_engine(db_url)
        try:
            for scenario in args.only:
                with temporary_queue("trapq-bench") as queue:
                    outcomes[scenario] = run(scenario, engine, db_url, queue, Path(tmp_dir), args)
        finally:
            engine.dispose()
    print(result_line(outcomes, args.trials))


def run(
    scenario: str, engine: Engine, db_url: str, queue: str, tmp: Path, args: argparse.Namespace
) -> Ran:
    """One scenario on its own queue; every worker it started is killed before it returns."""
    workers: list[WorkerProcess] = []
    env = service_env(tmp / "trapq-data", db_url, REDIS_URL, queue)

    def make(env: dict[str, str], **kwargs: object) -> WorkerProcess:
        log = tmp / f"{scenario}-worker-{len(workers)}.log"
        worker = WorkerProcess(env, log, **kwargs)  # type: ignore[arg-type]
        workers.append(worker)
        return worker

    lab = fs.Lab(engine, env, tmp / scenario, make)
    (tmp / scenario).mkdir()
    t0 = time.monotonic()
    outcome: Ran = None
    try:
        outcome = RUNNERS[scenario](lab, args.trials)
    except fs.Unavailable as e:
        print(f"{scenario}: skipped: {e}", flush=True)
        return e
    except Exception:
        print(f"{scenario}: FAILED to complete\n{traceback.format_exc()}")
    finally:
        for worker in workers:
            worker.kill()
    report(scenario, outcome, time.monotonic() - t0)
    return outcome


def report(scenario: str, outcome: Ran, wall_s: float) -> None:
    if isinstance(outcome, fs.BadInputOutcome):
        print(f"bad_inputs: {outcome.cases_ok}/{len(outcome.results)} cases as expected")
        for line in outcome.lines():
            print(f"  {line}")
    elif isinstance(outcome, fs.Outcome):
        print(outcome.line())
    print(f"  ({scenario} took {wall_s:.0f}s)", flush=True)


def result_line(outcomes: dict[str, Ran], trials: int) -> str:
    audits = [o.audit for o in outcomes.values()
              if isinstance(o, (fs.Outcome, fs.BadInputOutcome))]
    kill = outcomes.get("sigkill_restart")
    kill_ok = kill.trials_ok if isinstance(kill, fs.Outcome) and kill.ok else 0
    bad = outcomes.get("bad_inputs")
    bad_ok, bad_n = (
        (bad.cases_ok, len(bad.results)) if isinstance(bad, fs.BadInputOutcome) else (0, 0)
    )
    skipped = [name for name, o in outcomes.items() if isinstance(o, fs.Unavailable)]
    failed = [name for name, o in outcomes.items()
              if o is None or (name not in skipped and not o.ok)]
    figures = {
        key: value
        for o in outcomes.values() if isinstance(o, fs.Outcome)
        for key, value in o.counts.items() if key in RESULT_FIGURES
    }
    return (
        f"scenarios not ok: {', '.join(failed) or 'none'}; skipped: "
        f"{', '.join(skipped) or 'none'}\n"
        f"RESULT kill_trials_ok={kill_ok}/{trials} "
        f"duplicates={sum(a.duplicates for a in audits)} lost={sum(a.lost for a in audits)} "
        f"bad_inputs_ok={bad_ok}/{bad_n}"
        + "".join(f" {key}={value}" for key, value in figures.items())
    )


if __name__ == "__main__":
    main()
