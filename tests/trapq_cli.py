"""Running the `trapq` command line in tests: in-process by default, installed where it counts.

`trapq()` runs tasks.cli.main in this process with the given TRAPQ_* environment (and no
other TRAPQ_* variable) and captured output, as the installed command would, in milliseconds
instead of seconds of imports. `installed_trapq()` runs the installed entry point in a
subprocess: for the few tests proving the entry point itself, its exit codes and that errors
are one line (mark them `subprocess`). Both return a CompletedProcess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

from click.testing import CliRunner

from tasks.cli import main
from tasks.settings import get_settings

TRAPQ = Path(sys.executable).with_name("trapq")


def trapq(
    env: dict[str, str], *args: str, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`trapq ARGS` in-process with `env` as the whole environment (TRAPQ_* settings read
    afresh, AWS_* and the rest as a subprocess would see them); exit code and streams kept."""
    overrides: dict[str, str | None] = {k: None for k in os.environ if k not in env}
    overrides.update(env)
    argv = sys.argv
    get_settings.cache_clear()
    with CliRunner().isolation(input=input, env=overrides) as (out, err, _):
        sys.argv = ["trapq", *args]
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # a crash: shown as the installed command would show it
            traceback.print_exc()
            code = 1
        finally:
            sys.argv = argv
            get_settings.cache_clear()
        sys.stdout.flush()
        sys.stderr.flush()
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    return subprocess.CompletedProcess(["trapq", *args], code, stdout, stderr)


def installed_trapq(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The installed `trapq` entry point in a subprocess, as a user runs it."""
    return subprocess.run(
        [str(TRAPQ), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The error line of a failed command, after checking it failed the way users should see."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]
