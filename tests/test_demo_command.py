"""`trapq demo` on the embedded defaults: no server, a real worker, files a person can look at.

Small nights (a few captures) keep these quick; the full 48-capture night is `make demo`'s.
"""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tests.trapq_cli import TRAPQ, trapq

pytestmark = pytest.mark.subprocess  # the demo starts its own worker


def test_demo_runs_a_night_on_embedded_sqlite_and_writes_its_outputs(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAPQ_")}
    env.update(TRAPQ_DATA_DIR=str(tmp_path / "data"), OMP_NUM_THREADS="1")
    out = tmp_path / "out"

    result = trapq(env, "demo", "--captures", "4", "--chunk-size", "2", "--out", str(out))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "captures done 4, failed 0 of 4" in result.stdout
    assert (tmp_path / "data" / "trapq.db").is_file()
    assert (tmp_path / "data" / "broker.db").is_file()
    with (out / "detections.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) > 10
    # the shipped taxonomy and site list: answers are its taxa, never the two kinds the list
    # leaves out, each masked (and rolled up where the evidence is short of a family)
    taxonomy = Path(__file__).parents[1] / "inference/checkpoints/demo_classifier_taxonomy.csv"
    taxa = {line.split(",")[0] for line in taxonomy.read_text().splitlines()[1:]}
    assert {r["demo_classifier_label"] for r in rows} <= taxa - {"saturniid", "ctenuchid"}
    assert {r["demo_classifier_source"] for r in rows} <= {"masked", "masked-and-rolled-up"}
    assert "family" in {r["demo_classifier_rank"] for r in rows}
    assert "rank" in result.stdout and "family" in result.stdout
    annotated = sorted((out / "annotated").glob("*.jpg"))
    assert len(annotated) == 4
    with Image.open(annotated[0]) as im:
        assert im.size == (1920, 1080)


def test_a_second_demo_run_enqueues_only_the_night_it_generated(tmp_path: Path) -> None:
    """As a new user tries it (the installed command): `trapq demo`, then a smaller night
    elsewhere. Both runs share the job store in ./.trapq; the second reports its own 3
    captures, not 6 + 3."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAPQ_")}
    env.update(OMP_NUM_THREADS="1")

    def demo(*args: str) -> str:
        done = subprocess.run([str(TRAPQ), "demo", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    first = demo("--captures", "6")
    second = demo("--captures", "3", "--out", "other")

    assert "captures done 6, failed 0 of 6" in first
    assert "captures done 3, failed 0 of 3" in second
    assert (tmp_path / ".trapq" / "trapq.db").is_file(), "one job store for both runs"
    assert len(list((tmp_path / "other" / "annotated").glob("*.jpg"))) == 3
