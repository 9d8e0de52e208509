"""Every benchmark runs the way the README says, and also as a plain script.

`python bench/X.py` puts bench/ first on sys.path, where `tests` and `bench` are not
importable; each benchmark then imports as `python -m bench.X` would. `--help` imports the
whole module (torch, the job store, the test services) without running anything.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted(p.name for p in (ROOT / "bench").glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("script", BENCHMARKS)
def test_benchmark_runs_as_a_plain_script_from_any_folder(script: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--help"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: {script}"), done.stdout[:500]
