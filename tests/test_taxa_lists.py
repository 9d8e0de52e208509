"""A deployment's taxa list and the classifier's taxonomy are part of what a job runs: they
enter its stored pipeline and fingerprint, and bad ones are refused in one line before any
job exists."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

import tasks.producer as producer
from db.models import Deployment, Job
from db.pipelines import find_pipeline
from db.projects import set_deployment_project
from db.session import make_sessionmaker
from db.taxa import set_taxa_list
from inference.pipeline_spec import PipelineSpec
from inference.registry import CHECKPOINTS
from tasks.errors import UserError
from tasks.pipeline import pipeline_spec
from tasks.settings import Settings
from tests.test_enqueue import add_captures
from tests.trapq_cli import one_line_error, trapq

TAXONOMY = CHECKPOINTS / "demo_classifier_taxonomy.csv"


@pytest.fixture
def settings(tmp_path: Path, pg_url: str, redis_url: str, queue_name: str) -> Settings:
    return Settings(data_dir=tmp_path, database_url=pg_url, broker_url=redis_url,
                    result_backend=redis_url, queue=queue_name,
                    classifier_taxonomy=str(TAXONOMY), species_threshold=0.7)


def _jobs(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(Job)) or 0)


def test_a_deployments_list_enters_the_jobs_pipeline_and_another_list_is_another_fingerprint(
    settings: Settings, clean_pg: Engine
) -> None:
    add_captures(clean_pg, "trap-a", 4)
    plain = producer.enqueue(settings, "trap-a")
    with make_sessionmaker(clean_pg).begin() as session:
        set_taxa_list(session, "trap-a", ["Erebidae", "geometrid", "Zus zed"])
    listed = producer.enqueue(settings, "trap-a")
    with make_sessionmaker(clean_pg)() as session:
        jobs = {job.id: job for job in session.scalars(select(Job))}
    first = PipelineSpec.from_dict(jobs[plain.job_id].pipeline)
    second = PipelineSpec.from_dict(jobs[listed.job_id].pipeline)
    assert first.answers is not None and first.answers.taxa is None
    assert first.answers.threshold == 0.7 and first.answers.taxonomy is not None
    assert second.answers is not None
    assert second.answers.taxa == ("geometrid", "arctiid", "ctenuchid")  # Erebidae's two
    assert jobs[listed.job_id].fingerprint == second.fingerprint() != first.fingerprint()
    assert first.fingerprint() == pipeline_spec(settings).fingerprint()


def test_a_pipeline_without_taxonomy_or_list_keeps_its_fingerprint(settings: Settings) -> None:
    bare = pipeline_spec(settings.model_copy(update={"classifier_taxonomy": ""}))
    assert bare.answers is None
    assert "answers" not in bare.to_dict()


def test_a_list_naming_no_label_is_refused_before_any_job(
    settings: Settings, clean_pg: Engine
) -> None:
    add_captures(clean_pg, "trap-b", 2)
    with make_sessionmaker(clean_pg).begin() as session:
        set_taxa_list(session, "trap-b", ["Zus zed", "4242"])
    with pytest.raises(UserError, match=r"taxa list \(Zus zed, 4242\) names no label"):
        producer.enqueue(settings, "trap-b")
    assert _jobs(clean_pg) == 0


def test_a_taxonomy_that_does_not_fit_the_classifier_is_refused_in_one_line(
    settings: Settings, tmp_path: Path
) -> None:
    bad = tmp_path / "taxonomy.csv"
    bad.write_text(TAXONOMY.read_text().replace("ctenuchid,", "ctenuchids,"))
    with pytest.raises(UserError) as e:
        pipeline_spec(settings.model_copy(update={"classifier_taxonomy": str(bad)}))
    assert str(e.value).startswith("TRAPQ_CLASSIFIER_TAXONOMY: ")
    assert "'ctenuchid'" in str(e.value) and "\n" not in str(e.value)


def test_deployments_set_takes_a_taxa_list_and_refuses_an_empty_one(
    service_env: dict[str, str], clean_pg: Engine, tmp_path: Path
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n")
    bad = trapq(service_env, "deployments", "set", "trap-c", "--taxa-list", str(empty))
    assert "names nothing" in one_line_error(bad)
    good = tmp_path / "quebec.txt"
    good.write_text("# a northern trap\nNoctuidae\n797\n")
    done = trapq(service_env, "deployments", "set", "trap-c", "--taxa-list", str(good))
    assert done.returncode == 0, done.stderr
    with make_sessionmaker(clean_pg)() as session:
        stored = session.scalar(select(Deployment.taxa_list).where(Deployment.name == "trap-c"))
    assert stored == ["Noctuidae", "797"]


def test_a_projects_species_threshold_is_the_jobs_and_a_bad_one_is_refused(
    settings: Settings, service_env: dict[str, str], clean_pg: Engine
) -> None:
    add_captures(clean_pg, "trap-d", 2)
    bad = trapq(service_env, "projects", "add", "wild", "--species-threshold", "1.5")
    assert "species threshold 1.5 is outside (0, 1]" in one_line_error(bad)
    done = trapq(service_env, "projects", "add", "wild", "--species-threshold", "0.8")
    assert done.returncode == 0, done.stderr
    with make_sessionmaker(clean_pg).begin() as session:
        set_deployment_project(session, "trap-d", "wild")
    job = producer.enqueue(settings, "trap-d")
    with make_sessionmaker(clean_pg)() as session:
        stored = session.scalar(select(Job.pipeline).where(Job.id == job.job_id))
    answers = PipelineSpec.from_dict(stored).answers
    assert answers is not None and answers.threshold == 0.8


def test_pipelines_add_takes_a_taxonomy_and_threshold_into_the_recorded_spec(
    service_env: dict[str, str], clean_pg: Engine
) -> None:
    bad = trapq(service_env, "pipelines", "add", "regional", "--taxonomy", str(TAXONOMY),
                "--species-threshold", "0")
    assert "TRAPQ_SPECIES_THRESHOLD: species threshold 0.0 is outside (0, 1]" in (
        one_line_error(bad))
    done = trapq(service_env, "pipelines", "add", "regional", "--taxonomy", str(TAXONOMY),
                 "--species-threshold", "0.75")
    assert done.returncode == 0, done.stderr
    with make_sessionmaker(clean_pg)() as session:
        stored = find_pipeline(session, "regional")
    answers = PipelineSpec.from_dict(stored.spec).answers
    assert answers is not None and answers.threshold == 0.75 and answers.taxonomy is not None
