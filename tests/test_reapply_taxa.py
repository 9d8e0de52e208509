"""A finished job's answers follow a taxa list set afterwards, recomputed from the softmax
each classification stored, without the device; where a softmax is missing nothing changes
and the one line names the re-classification run to do instead."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, select, update

from db.imports import get_or_create_deployment, insert_captures
from db.jobs import create_job
from db.models import Capture, Classification, Job
from db.results import write_results
from db.session import make_sessionmaker
from db.taxa import set_taxa_list
from inference.pipeline_spec import PipelineSpec
from inference.types import Classification as Answer
from inference.types import Detection, ItemResult
from tasks.errors import UserError
from tasks.reapply import reapply
from tests.test_exports_taxonomy import LABELS, PIPELINE
from tests.trapq_cli import trapq


def _softmax(**probs: float) -> bytes:
    return np.array([probs.get(label, 0.0) for label in LABELS], np.float16).tobytes()


def _job(engine: Engine, tmp_path: Path, stored: list[bytes | None]) -> int:
    """A done job of one capture, a box per stored softmax, each answered Erebidae."""
    factory = make_sessionmaker(engine)
    with factory.begin() as s:
        dep = get_or_create_deployment(s, "night-11")
        insert_captures(s, dep, [{"uri": str(tmp_path / "a.jpg"), "captured_at": None,
                                  "width": 100, "height": 100}])
        spec = PipelineSpec.from_dict(PIPELINE)
        job_id = create_job(s, dep, pipeline=spec.to_dict(), fingerprint=spec.fingerprint(),
                            chunk_size=1).job_id
        capture_id = s.scalar(select(Capture.id))
    boxes = [Detection(10 * i, 0, 10 * i + 5, 5, 0.9, "insect", [Answer(
        "demo_classifier", "Erebidae", 0.6, [("noctuid", 0.4)], rank="family",
        source="rolled-up", probabilities=probs)]) for i, probs in enumerate(stored)]
    with factory.begin() as s:
        write_results(s, job_id, [ItemResult(capture_id, "a.jpg", 100, 100, boxes)])
        s.execute(update(Job).where(Job.id == job_id).values(state="done"))
    return job_id


def test_a_list_set_later_is_reapplied_from_the_stored_softmax(
    clean_pg: Engine, tmp_path: Path
) -> None:
    job_id = _job(clean_pg, tmp_path, [_softmax(noctuid=0.4, arctiid=0.3, ctenuchid=0.3),
                                       _softmax(noctuid=0.9, arctiid=0.1)])
    factory = make_sessionmaker(clean_pg)
    with factory.begin() as s:
        set_taxa_list(s, "night-11", ["arctiid", "Noctuidae"])
        before = s.scalar(select(Job.fingerprint).where(Job.id == job_id))
    done = reapply(factory, job_id)
    with factory() as s:
        rows = s.execute(select(Classification.label, Classification.score, Classification.rank,
                                Classification.prediction_source, Classification.topk)
                         .order_by(Classification.id)).all()
        job = s.get(Job, job_id)
        assert job is not None
        spec = PipelineSpec.from_dict(job.pipeline)
    # 0.4 and 0.3 renormalised over the two kept labels: noctuid 4/7, below 0.6, so up to
    # their common superfamily Noctuoidea at 1; the second: noctuid 0.9 / 1.0
    assert [(label, rank, source) for label, _, rank, source, _ in rows] == [
        ("Noctuoidea", "superfamily", "masked-and-rolled-up"), ("noctuid", "family", "masked")]
    assert rows[0][1] == pytest.approx(1.0, abs=1e-3)
    assert rows[0][4][0][0] == "noctuid" and rows[0][4][0][1] == pytest.approx(4 / 7, abs=1e-3)
    assert done.classifications == 2 and done.changed == 2
    assert spec.answers is not None and spec.answers.taxa == ("noctuid", "arctiid")
    assert job.fingerprint == spec.fingerprint() == done.fingerprint != before
    assert reapply(factory, job_id).unchanged_policy


def test_a_job_without_stored_softmax_says_which_run_to_do(
    clean_pg: Engine, tmp_path: Path, service_env: dict[str, str]
) -> None:
    job_id = _job(clean_pg, tmp_path, [_softmax(noctuid=1.0), None])
    factory = make_sessionmaker(clean_pg)
    with factory.begin() as s:
        set_taxa_list(s, "night-11", ["geometrid"])
    with pytest.raises(UserError, match=f"--reuse-detections-from {job_id}"):
        reapply(factory, job_id)
    with factory() as s:
        assert s.scalars(select(Classification.label)).all() == ["Erebidae", "Erebidae"]
    done = trapq(service_env, "reapply", str(job_id))
    assert done.returncode == 1 and "1 classifications of job" in done.stderr
