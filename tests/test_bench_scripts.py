"""Every benchmark runs the way the README says, and also as a plain script.

`python bench/X.py` puts bench/ first on sys.path, where `tests` and `bench` are not
importable; each benchmark then imports as `python -m bench.X` would. `--help` imports the
whole module (torch, the job store, the test services) without running anything.

All of them run in one Python process, started in another folder: before each, sys.path[0]
is bench/ and the repository's own packages are forgotten (torch and the other installed
libraries stay imported), so each script has to find them as a plain script would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted(p.name for p in (ROOT / "bench").glob("*.py") if p.name != "__init__.py")
OWN_PACKAGES = ("bench", "tests", "db", "tasks", "inference", "migrations", "synthetic")

AS_PLAIN_SCRIPTS = """
import contextlib, io, json, runpy, sys
bench, own, scripts = sys.argv[1], tuple(sys.argv[2].split(",")), sys.argv[3:]
path = [p for p in sys.path[1:] if p not in ("", bench.rsplit("/", 1)[0])]
report = {}
for script in scripts:
    for name in [m for m in sys.modules if m.split(".")[0] in own]:
        del sys.modules[name]
    sys.path[:] = [bench, *path]
    sys.argv = [f"{bench}/{script}", "--help"]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as e:
            code = e.code or 0
        except BaseException as e:
            code, _ = 1, err.write(repr(e))
    report[script] = [code, out.getvalue()[:500], err.getvalue()[-2000:]]
print(json.dumps(report))
"""


@pytest.mark.subprocess
def test_every_benchmark_runs_as_a_plain_script_from_any_folder(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", AS_PLAIN_SCRIPTS, str(ROOT / "bench"), ",".join(OWN_PACKAGES),
         *BENCHMARKS],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(report) == BENCHMARKS
    for script, (code, out, err) in report.items():
        assert code == 0, f"{script}: {err}"
        assert out.startswith(f"usage: {script}"), f"{script}: {out}"
