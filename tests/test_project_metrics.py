"""`trapq status` per project and `trapq metrics` read the same figures from the job store;
the Grafana dashboard asks only for metrics the exporter serves."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import Engine, text

from db.project_status import project_figures
from db.session import make_sessionmaker
from tasks.job_store_metrics import EXPORTED, JobStoreCollector
from tests.test_dispatch import job_in, round_
from tests.trapq_cli import trapq
from tests.worker_jobs import settings_of

DASHBOARD = Path(__file__).resolve().parents[1] / "grafana-dashboard.json"
NOW = datetime(2026, 12, 4, 22, 0, tzinfo=UTC)


def run_chunks(engine: Engine, job_id: int, n: int, seconds: float, ended: datetime) -> None:
    """n of the job's out chunks ran `seconds` each and ended at `ended`, all captures done."""
    with engine.begin() as conn:
        conn.execute(text(
            "UPDATE chunks SET state = 'done', n_done = n_items, started_at = :s, "
            "finished_at = :e WHERE id IN (SELECT id FROM chunks WHERE job_id = :j "
            "AND state = 'queued' ORDER BY seq LIMIT :n)"
        ), {"j": job_id, "n": n, "s": ended - timedelta(seconds=seconds), "e": ended})
        conn.execute(text("UPDATE jobs SET state = 'running', started_at = :s WHERE id = :j"),
                     {"j": job_id, "s": ended - timedelta(minutes=5)})


def test_shares_and_etas_come_from_the_chunks_of_the_last_hour(clean_pg: Engine) -> None:
    heavy = job_in(clean_pg, "heavy", 20, "h", weight=3)
    light = job_in(clean_pg, "light", 20, "l", weight=1)
    round_(clean_pg, window=8)
    run_chunks(clean_pg, heavy, 6, 30.0, NOW - timedelta(minutes=2))
    run_chunks(clean_pg, light, 2, 30.0, NOW - timedelta(minutes=2))

    with make_sessionmaker(clean_pg)() as s:
        figures = {f.name: f for f in project_figures(s, NOW)}

    h, lt = figures["heavy"], figures["light"]
    assert (h.gpu_share, lt.gpu_share) == (0.75, 0.25)
    assert (h.weight_share, lt.weight_share) == (0.75, 0.25)
    assert (h.captures_done_last_hour, h.chunks_pending, h.captures_pending) == (12, 14, 28)
    (eta,) = h.jobs
    # 12 captures in the 7 minutes since the job began, 28 left
    assert (eta.done, eta.left) == (12, 28)
    assert abs(eta.eta_s - 28 / (12 / 420)) < 1e-6  # type: ignore[operator]


def test_the_exporter_serves_every_named_metric_and_the_dashboard_asks_for_no_other(
    service_env: dict[str, str], clean_pg: Engine
) -> None:
    job = job_in(clean_pg, "moths", 4, "m", weight=2)
    round_(clean_pg, window=2)
    registry = CollectorRegistry()
    registry.register(JobStoreCollector(settings_of(service_env), make_sessionmaker(clean_pg)))

    page = generate_latest(registry).decode()
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]

    assert f'trapq_job_chunks_pending{{job="{job}",project="moths"}} 2.0' in page
    assert 'trapq_project_chunks_in_flight{project="moths"} 2.0' in page
    assert "trapq_dispatch_window 4.0" in page
    served = {m for m in EXPORTED if f"# TYPE {m} gauge" in page}
    assert served == set(EXPORTED)
    assert queries
    for query in queries:
        names = set(re.findall(r"\btrapq_[a-z_]+", query))
        assert names and names <= set(EXPORTED), query


def test_status_lists_each_project_with_its_share_and_eta(
    service_env: dict[str, str], clean_pg: Engine
) -> None:
    job_in(clean_pg, "moths", 4, "m", weight=2)

    out = trapq(service_env, "status").stdout

    (row,) = [line for line in out.splitlines() if line.startswith("│ moths")]
    assert row.split("│")[2].strip() == "2"  # its weight
    assert "1: ? (8 left)" in row and "captures left / its captures per second" in out
