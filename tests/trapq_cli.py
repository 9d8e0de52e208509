"""Running the `trapq` command line the way a user does: a subprocess with TRAPQ_* variables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TRAPQ = Path(sys.executable).with_name("trapq")


def trapq(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
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
