"""`trapq compare --rank`: two jobs compared at a rank of their taxonomy."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import Engine, select

from db.imports import get_or_create_deployment, insert_captures
from db.jobs import create_job
from db.models import Capture
from db.results import write_results
from db.session import make_sessionmaker
from inference.types import Classification, Detection, ItemResult
from tests.test_exports_taxonomy import PIPELINE
from tests.trapq_cli import one_line_error, trapq


def test_compare_at_a_rank_counts_congeners_as_agreeing(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine
) -> None:
    """Two jobs call one box arctiid and ctenuchid: they disagree as labels, and agree at the
    family (both Erebidae); a job without a taxonomy cannot be compared at a rank."""
    factory = make_sessionmaker(clean_pg)
    with factory.begin() as s:
        dep = get_or_create_deployment(s, "night-10")
        insert_captures(s, dep, [{"uri": str(tmp_path / "a.jpg"), "captured_at": None,
                                  "width": 1000, "height": 1000}])
        jobs = [create_job(s, dep, pipeline=PIPELINE, fingerprint=f"{i}" * 64,
                           chunk_size=1).job_id for i in (1, 2)]
        bare = create_job(s, dep, pipeline={**PIPELINE, "answers": None}, fingerprint="3" * 64,
                          chunk_size=1).job_id
        capture_id = s.scalar(select(Capture.id))
    for job_id, label in zip(jobs, ("arctiid", "ctenuchid"), strict=True):
        answer = Classification("demo_classifier", label, 0.9, [(label, 0.9)], rank="subfamily")
        with factory.begin() as s:
            write_results(s, job_id, [ItemResult(capture_id, "a.jpg", 1000, 1000, [
                Detection(100, 100, 300, 300, 0.9, "insect", [answer])])])

    def agreement(*extra: str) -> dict[str, object]:
        done = trapq(service_env, "compare", str(jobs[0]), str(jobs[1]), "--format", "json",
                     *extra)
        assert done.returncode == 0, done.stderr
        (classifier,) = json.loads(done.stdout)["agreement"]
        return classifier

    assert agreement()["agree"] == 0
    assert agreement("--rank", "family")["agree"] == 1
    refused = trapq(service_env, "compare", str(jobs[0]), str(bare), "--rank", "genus")
    assert f"job {bare} ran without a taxonomy" in one_line_error(refused)
