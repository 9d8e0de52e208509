"""Fault and bad-input figures: the scenarios of tests/test_faults.py and
tests/test_bad_inputs_worker.py (tests/fault_scenarios.py), run once and printed together.

Uses a fresh temporary PostgreSQL database and fresh queue names, removed afterwards; every
worker and redis-server it starts is killed when it ends. No timing is asserted: the figures
are counts (trials that hit a chunk mid-way, duplicate rows, lost work items, corpus cases
that ended as expected).

    .venv/bin/python bench/faults.py [--trials N] [--only NAME ...]

Environment: TRAPQ_TEST_PG_URL (an admin URL, default postgres@127.0.0.1/test) and
TRAPQ_TEST_REDIS_URL (default redis://127.0.0.1:6379/1), as the tests use.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path

import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import migrations  # noqa: E402
from db.session import make_engine  # noqa: E402
from tests import fault_scenarios as fs  # noqa: E402
from tests.worker_process import WorkerProcess  # noqa: E402

PG_ADMIN_URL = os.environ.get(
    "TRAPQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("TRAPQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/1")
RUNNERS: dict[str, Callable[[fs.Lab, int], fs.Outcome | fs.BadInputOutcome]] = {
    "sigkill_restart": lambda lab, trials: fs.sigkill_restart(lab, trials=trials),
    "redis_restart": lambda lab, _: fs.redis_restart(lab),
    "redis_data_lost": lambda lab, _: fs.redis_data_lost(lab),
    "pg_terminate": lambda lab, _: fs.pg_terminate(lab),
    "sigterm_warm": lambda lab, _: fs.sigterm_warm(lab),
    "bad_inputs": lambda lab, _: fs.bad_inputs(lab),
}
SCENARIOS = tuple(RUNNERS)


def admin(sql: str) -> None:
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(sql))
    engine.dispose()


def base_env(tmp: Path, db_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAPQ_")}
    env.update(
        TRAPQ_DATA_DIR=str(tmp / "trapq-data"),
        TRAPQ_DATABASE_URL=db_url,
        TRAPQ_BROKER_URL=REDIS_URL,
        TRAPQ_RESULT_BACKEND=REDIS_URL,
        TRAPQ_DEVICE="cpu",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10, help="SIGKILLs over the one job")
    ap.add_argument("--only", nargs="*", choices=SCENARIOS, default=list(SCENARIOS))
    args = ap.parse_args()

    name = f"trapq_bench_{uuid.uuid4().hex[:10]}"
    admin(f'CREATE DATABASE "{name}"')
    db_url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    migrations.upgrade(db_url)
    engine = make_engine(db_url)
    workers: list[WorkerProcess] = []
    queues: list[str] = []
    outcomes: dict[str, fs.Outcome | fs.BadInputOutcome | None] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="trapq-faults-") as tmp_dir:
            tmp = Path(tmp_dir)
            for scenario in args.only:
                queue = f"trapq-bench-{uuid.uuid4().hex[:10]}"
                queues.append(queue)
                env = {**base_env(tmp, db_url), "TRAPQ_QUEUE": queue}

                def make(env: dict[str, str], **kwargs: object) -> WorkerProcess:
                    log = tmp / f"worker-{len(workers)}.log"
                    worker = WorkerProcess(env, log, **kwargs)  # type: ignore[arg-type]
                    workers.append(worker)
                    return worker

                lab = fs.Lab(engine, env, tmp / scenario, make)
                (tmp / scenario).mkdir()
                t0 = time.monotonic()
                try:
                    outcomes[scenario] = RUNNERS[scenario](lab, args.trials)
                except Exception:
                    outcomes[scenario] = None
                    print(f"{scenario}: FAILED to complete\n{traceback.format_exc()}")
                finally:
                    for worker in workers:
                        worker.kill()
                report(scenario, outcomes[scenario], time.monotonic() - t0)
    finally:
        for worker in workers:
            worker.kill()
        engine.dispose()
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        client = redis.Redis.from_url(REDIS_URL)
        if queues:
            client.delete(*queues)
        client.close()
    print(result_line(outcomes, args.trials))


def report(scenario: str, outcome: fs.Outcome | fs.BadInputOutcome | None, wall_s: float) -> None:
    if isinstance(outcome, fs.BadInputOutcome):
        print(f"bad_inputs: {outcome.cases_ok}/{len(outcome.results)} cases as expected")
        for line in outcome.lines():
            print(f"  {line}")
    elif outcome is not None:
        print(outcome.line())
    print(f"  ({scenario} took {wall_s:.0f}s)", flush=True)


def result_line(outcomes: dict[str, fs.Outcome | fs.BadInputOutcome | None], trials: int) -> str:
    audits = [o.audit for o in outcomes.values() if o is not None]
    kill = outcomes.get("sigkill_restart")
    kill_ok = kill.trials_ok if isinstance(kill, fs.Outcome) and kill.ok else 0
    bad = outcomes.get("bad_inputs")
    bad_ok, bad_n = (
        (bad.cases_ok, len(bad.results)) if isinstance(bad, fs.BadInputOutcome) else (0, 0)
    )
    failed = [name for name, o in outcomes.items() if o is None or not o.ok]
    return (
        f"scenarios not ok: {', '.join(failed) or 'none'}\n"
        f"RESULT kill_trials_ok={kill_ok}/{trials} "
        f"duplicates={sum(a.duplicates for a in audits)} lost={sum(a.lost for a in audits)} "
        f"bad_inputs_ok={bad_ok}/{bad_n}"
    )


if __name__ == "__main__":
    main()
