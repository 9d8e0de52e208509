"""Named pipelines in the job store: versions per name, the same contents found again, and two
adds of one name in two real PostgreSQL transactions at once never sharing a version."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import Engine, select, text

from db.imports import get_or_create_deployment
from db.jobs import create_job
from db.models import Job
from db.pipelines import (
    PipelineError,
    add_pipeline,
    detector_fingerprint,
    find_pipeline,
    job_pipeline,
    list_pipelines,
    remove_pipeline,
)
from db.session import make_sessionmaker


def spec(classifier_sha: str, threshold: float = 0.5) -> dict[str, Any]:
    def model(name: str, sha: str) -> dict[str, Any]:
        return {"name": name, "sha256": sha, "labels": ["a", "b"], "input_size": [64, 64],
                "weights": f"/w/{sha}.pt"}

    return {"detector": model("demo_detector", "d" * 64), "classifier": model(
        "demo_classifier", classifier_sha), "filter": None, "box_threshold": threshold,
        "top_k": 3, "filter_negative_label": "nonmoth"}


def test_adding_a_name_again_makes_a_version_only_for_other_contents(clean_pg: Engine) -> None:
    factory = make_sessionmaker(clean_pg)
    with factory.begin() as s:
        first, created = add_pipeline(s, "quebec", spec("1" * 64), "f1" * 32)
        assert (first.label, created) == ("quebec@1", True)
        again, created = add_pipeline(s, "quebec", spec("1" * 64), "f1" * 32)
        assert (again.label, created) == ("quebec@1", False)
        second, created = add_pipeline(s, "quebec", spec("2" * 64), "f2" * 32)
        assert (second.label, created) == ("quebec@2", True)
        with pytest.raises(PipelineError, match="these contents are pipeline quebec@2 already"):
            add_pipeline(s, "panama", spec("2" * 64), "f2" * 32)
    with factory.begin() as s:
        assert find_pipeline(s, "quebec").version == 2
        assert find_pipeline(s, "quebec@1").fingerprint == "f1" * 32
        with pytest.raises(PipelineError, match=r"no pipeline quebec@3; known: quebec@1, quebec@2"):
            find_pipeline(s, "quebec@3")


def test_two_adds_of_one_name_in_concurrent_transactions_get_two_versions(
    clean_pg: Engine,
) -> None:
    """A holds version 1 uncommitted; B, started meanwhile, also computes version 1 and blocks
    on the unique index; once A commits, B takes version 2 in the same transaction."""
    factory = make_sessionmaker(clean_pg)
    a = factory()
    add_pipeline(a, "uk", spec("a" * 64), "fa" * 32)
    a.flush()
    outcome: dict[str, Any] = {}

    def other() -> None:
        with factory.begin() as b:
            b.execute(text("SET application_name = 'trapq-second-add'"))
            stored, created = add_pipeline(b, "uk", spec("b" * 64), "fb" * 32)
            outcome["label"], outcome["created"] = stored.label, created

    thread = threading.Thread(target=other)
    thread.start()
    deadline = time.monotonic() + 30
    with clean_pg.connect() as probe:
        while time.monotonic() < deadline:
            waiting = probe.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                "'trapq-second-add' AND wait_event_type = 'Lock'"
            )).scalar()
            probe.rollback()  # pg_stat_activity is read once per transaction
            if waiting:
                break
            time.sleep(0.05)
    a.commit()
    a.close()
    thread.join(30)
    assert waiting, "the second add never waited on the first one's version"
    assert outcome == {"label": "uk@2", "created": True}
    with factory.begin() as s:
        assert [(r.pipeline.version, r.pipeline.fingerprint) for r in list_pipelines(s)] == [
            (1, "fa" * 32), (2, "fb" * 32)
        ]


def test_a_job_pins_its_version_and_removal_waits_for_its_end(clean_pg: Engine) -> None:
    factory = make_sessionmaker(clean_pg)
    with factory.begin() as s:
        stored, _ = add_pipeline(s, "panama", spec("c" * 64), "fc" * 32)
        dep = get_or_create_deployment(s, "d")
        plan = create_job(s, dep, pipeline=stored.spec, fingerprint=stored.fingerprint,
                          pipeline_id=stored.id, chunk_size=4)
    with factory.begin() as s:
        job = job_pipeline(s, plan.job_id)
        assert job is not None and job.label == "panama@1"
        assert s.scalar(select(Job.detector_fingerprint).where(Job.id == plan.job_id)) == (
            detector_fingerprint(spec("c" * 64))
        )
        (row,) = list_pipelines(s)
        assert (row.jobs, row.active_jobs) == (1, 1)
        busy = rf"used by jobs that have not ended \({plan.job_id}\)"
        with pytest.raises(PipelineError, match=busy):
            remove_pipeline(s, "panama")
    with factory.begin() as s:
        s.execute(text("UPDATE jobs SET state = 'done'"))
    with factory.begin() as s:
        assert remove_pipeline(s, "panama") == ["panama@1"]
    with factory.begin() as s:
        job = job_pipeline(s, plan.job_id)
        assert job is not None and job.name is None and job.classifier is not None
        assert job.classifier.sha256 == "c" * 64
