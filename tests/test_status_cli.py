"""`trapq status` and `trapq deployments` report what the job store holds."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

import tasks.producer as producer
from tasks.settings import Settings
from tests.services import temporary_database
from tests.test_enqueue import add_captures
from tests.trapq_cli import TRAPQ, one_line_error, trapq

STARTED = datetime(2024, 6, 2, 3, 0, tzinfo=UTC)


def table_rows(out: str) -> dict[str, list[str]]:
    """The rows of a Rich table by first cell (continuation lines of wrapped cells skipped)."""
    rows = {}
    for line in out.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            if cells[0]:
                rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture
def empty_database_url() -> Iterator[str]:
    with temporary_database("trapq_test_unmigrated", migrate=False) as url:
        yield url


@pytest.fixture
def job_id(tmp_path: Path, service_env: dict[str, str], clean_pg: Engine) -> int:
    """A job of 100 captures in 4 chunks of 25, sent to the test's queue."""
    add_captures(clean_pg, "trap-a", 100)
    settings = Settings(
        data_dir=tmp_path,
        database_url=service_env["TRAPQ_DATABASE_URL"],
        broker_url=service_env["TRAPQ_BROKER_URL"],
        result_backend=service_env["TRAPQ_RESULT_BACKEND"],
        queue=service_env["TRAPQ_QUEUE"],
    )
    result = producer.enqueue(settings, "trap-a", chunk_size=25)
    assert result.job_id is not None
    return result.job_id


def finish_chunk(engine: Engine, job_id: int, seq: int, failed_items: int = 0) -> None:
    """What a worker records when it ends a chunk: items done/failed, timings, the chunk done."""
    with engine.begin() as conn:
        chunk_id = conn.execute(
            text("SELECT id FROM chunks WHERE job_id = :j AND seq = :s"), {"j": job_id, "s": seq}
        ).scalar_one()
        conn.execute(
            text("UPDATE job_captures SET state = 'done' WHERE chunk_id = :c"), {"c": chunk_id}
        )
        conn.execute(
            text(
                "UPDATE job_captures SET state = 'failed', error_kind = 'undecodable', "
                "error = 'truncated' WHERE chunk_id = :c "
                "AND capture_id IN (SELECT capture_id FROM job_captures WHERE chunk_id = :c "
                "ORDER BY capture_id LIMIT :n)"
            ),
            {"c": chunk_id, "n": failed_items},
        )
        conn.execute(
            text(
                "UPDATE chunks SET state = 'done', started_at = :start, finished_at = :end, "
                "n_done = n_items - :n, n_failed = :n, fetch_s = 1.5, gpu_s = 2.0, write_s = 0.5 "
                "WHERE id = :c"
            ),
            {
                "c": chunk_id,
                "n": failed_items,
                "start": STARTED + timedelta(seconds=5 * seq),
                "end": STARTED + timedelta(seconds=5 * seq + 5),
            },
        )


def test_status_of_a_job_counts_captures_and_chunks_by_state_with_timings(
    job_id: int, service_env: dict[str, str], clean_pg: Engine
) -> None:
    finish_chunk(clean_pg, job_id, 0, failed_items=2)
    finish_chunk(clean_pg, job_id, 1)

    result = trapq(service_env, "status", str(job_id))

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"job {job_id} · deployment trap-a" in out
    counts = {m[1]: (m[2], m[3]) for m in re.finditer(r"^\s*(\w+)\s+(\d*)\s+(\d+)\s*$", out, re.M)}
    assert counts["pending"] == ("50", "0")
    assert counts["queued"] == ("", "2")
    assert counts["done"] == ("48", "2")
    assert counts["failed"] == ("2", "0")
    assert counts["total"] == ("100", "4")
    assert "throughput:" in out
    assert "failed captures by reason: undecodable 2" in out
    assert "per chunk (2 timed): fetch+decode 1.50 s, GPU 2.00 s, write 0.50 s" in out
    assert "wall 5.00 s, 5.0 images/s" in out


def test_status_of_an_ended_job_measures_throughput_up_to_its_last_chunk(
    job_id: int, service_env: dict[str, str], clean_pg: Engine
) -> None:
    for seq in range(4):
        finish_chunk(clean_pg, job_id, seq)

    result = trapq(service_env, "status", str(job_id), "--watch")

    assert result.returncode == 0, result.stderr
    assert "100/100" in result.stdout
    assert "throughput: 5.0 images/s" in result.stdout  # 100 captures over 4 chunks of 5 s


class Terminal:
    """The screen of a process run in a pseudo-terminal, as a person at a shell sees it (Rich
    draws its live progress only on a terminal)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.fd, child = pty.openpty()
        self.proc = subprocess.Popen(argv, env=env | {"COLUMNS": "160"}, stdin=subprocess.DEVNULL,
                                     stdout=child, stderr=child, start_new_session=True)
        os.close(child)
        self.screen = ""

    def wait_for(self, text: str, timeout_s: float) -> None:
        """Read the screen until `text` shows (event-driven: no fixed sleeps)."""
        deadline = time.monotonic() + timeout_s
        while text not in self.screen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} on the screen after {timeout_s} s:\n{self.screen}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the process has exited and its terminal closed
                    chunk = b""
                assert chunk, f"exited before {text!r} showed:\n{self.screen}"
                self.screen += chunk.decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self.fd)


@pytest.mark.subprocess  # a live terminal: the installed command, watched as it redraws
def test_watch_follows_a_live_job_until_its_chunks_end(
    job_id: int, service_env: dict[str, str], clean_pg: Engine
) -> None:
    """Half the job is done when the watch starts: it shows 50/100 and keeps following while
    chunks are still queued, then ends at 100/100 once they end."""
    finish_chunk(clean_pg, job_id, 0)
    finish_chunk(clean_pg, job_id, 1)
    term = Terminal([str(TRAPQ), "status", str(job_id), "--watch", "--interval", "0.2"],
                    service_env)
    try:
        term.wait_for("50/100", timeout_s=120)
        assert term.proc.poll() is None, "a live job keeps the watch going"
        finish_chunk(clean_pg, job_id, 2)
        term.wait_for("75/100", timeout_s=60)
        assert term.proc.poll() is None
        finish_chunk(clean_pg, job_id, 3)
        term.wait_for("100/100", timeout_s=60)
        assert term.proc.wait(timeout=60) == 0, term.screen
    finally:
        term.close()


def test_status_without_a_job_lists_recent_jobs(
    job_id: int, service_env: dict[str, str], clean_pg: Engine
) -> None:
    finish_chunk(clean_pg, job_id, 0)

    result = trapq(service_env, "status")

    assert result.returncode == 0, result.stderr
    assert table_rows(result.stdout)[str(job_id)][:6] == [
        "trap-a",
        "pending",
        "100",
        "25",
        "0",
        "4",
    ]


def test_deployments_lists_capture_counts(service_env: dict[str, str], clean_pg: Engine) -> None:
    add_captures(clean_pg, "trap-a", 30)
    add_captures(clean_pg, "trap-b", 7)

    result = trapq(service_env, "deployments")

    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert {name: cells[0] for name, cells in rows.items()} == {"trap-a": "30", "trap-b": "7"}


def test_status_of_an_unknown_job_is_a_one_line_error(
    service_env: dict[str, str], clean_pg: Engine
) -> None:
    assert "no job 999" in one_line_error(trapq(service_env, "status", "999"))


def test_commands_on_an_unmigrated_database_say_to_run_db_upgrade(
    service_env: dict[str, str], empty_database_url: str
) -> None:
    env = service_env | {"TRAPQ_DATABASE_URL": empty_database_url}

    assert "run `trapq db upgrade`" in one_line_error(trapq(env, "deployments"))
    upgraded = trapq(env, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert "no deployments yet" in trapq(env, "deployments").stdout


def test_a_fresh_embedded_job_store_is_created_on_first_use(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAPQ_")}
    env["TRAPQ_DATA_DIR"] = str(tmp_path / "data")

    result = trapq(env, "deployments")

    assert result.returncode == 0, result.stderr
    assert "no deployments yet" in result.stdout
    assert (tmp_path / "data" / "trapq.db").is_file()
