"""`python -m bench.gpu_check --device cpu` runs end to end: every check a CPU can run passes,
each CUDA-only one says why it was skipped, it leaves no temporary folder behind, and it
imports nothing a bare torch image lacks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parent.parent
NOT_ON_A_BARE_TORCH_IMAGE = (
    "celery", "kombu", "pydantic", "pydantic_settings", "sqlalchemy", "psycopg", "redis",
    "boto3", "typer", "s3fs",
)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_gpu_check_imports_only_what_a_bare_torch_image_has() -> None:
    code = (
        "import sys, bench.gpu_check; "
        f"print(sorted(m for m in {NOT_ON_A_BARE_TORCH_IMAGE!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=ROOT, text=True,
                         capture_output=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_gpu_check_runs_end_to_end_on_the_cpu_skips_only_cuda_checks_and_leaves_no_files(
    tmp_path: Path,
) -> None:
    argv = [
        sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--n", "4",
        "--size", "320x180", "--detectors", "ssdlite320_mobilenet_v3_large,constant_boxes",
        "--throughput-detector", "fasterrcnn_mobilenet_v3_large_320_fpn",
        "--throughput-classifier", "demo_classifier",
    ]
    done = subprocess.run(argv, env={**_env(), "TMPDIR": str(tmp_path)}, cwd=ROOT, text=True,
                          capture_output=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    results = {
        line.split()[1].removeprefix("check="): line.split()[2].removeprefix("status=")
        for line in done.stdout.splitlines() if line.startswith("RESULT check=")
    }
    assert results == {
        "decode": "pass",
        "precision:ssdlite320_mobilenet_v3_large": "pass",
        "precision:constant_boxes": "pass",
        "oom": "skip",
        "sticky": "pass",  # the error CUDA reports, injected: a CPU has no device asserts
        "throughput": "measured",
        "compile": "skip",
    }
    for check in ("oom", "compile"):
        assert f"skipped {check}: CUDA only" in done.stdout
    assert "skipped decode/nvJPEG parts: no CUDA device" in done.stdout
    inputs = re.search(r"^inputs: .* in (\S+), ", done.stdout, re.M)
    assert inputs and not Path(inputs.group(1)).exists(), "the inputs' folder is left behind"
    assert list(tmp_path.iterdir()) == [], "a temporary folder is left behind"
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT gpu_check device=cpu passed=4 failed=0 skipped=2")
