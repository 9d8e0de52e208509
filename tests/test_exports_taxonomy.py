"""Exports of a job whose answers rolled up its taxonomy: every format names the answer at
the rank it reached, by its scientific name, and still validates against the format's rules."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path

import jsonschema
import pytest
from frictionless import Package
from sqlalchemy import Engine, select, update

from db.deployments import DeploymentMetadata, set_metadata
from db.imports import get_or_create_deployment, insert_captures
from db.jobs import create_job
from db.models import Capture, Occurrence
from db.models import Detection as DetectionRow
from db.results import write_results
from db.session import make_sessionmaker
from inference.registry import CHECKPOINTS
from inference.taxonomy import AnswerPolicy, load_taxonomy
from inference.types import Classification, Detection, ItemResult
from tests.test_exports import CAMTRAP, CAMTRAP_OPTIONS, SCHEMAS, read_csv
from tests.trapq_cli import trapq

LABELS = tuple((CHECKPOINTS / "demo_classifier_labels.txt").read_text().split())
TAXONOMY = load_taxonomy(CHECKPOINTS / "demo_classifier_taxonomy.csv", LABELS)
PIPELINE = {
    "detector": {"name": "demo_detector", "labels": ["insect"], "sha256": "1" * 64,
                 "input_size": [540, 960], "weights": "d.pt"},
    "classifier": {"name": "demo_classifier", "labels": list(LABELS), "sha256": "2" * 64,
                   "input_size": [64, 64], "weights": "c.pt"},
    "filter": None,
    "box_threshold": 0.5,
    "top_k": 3,
    "filter_negative_label": "nonmoth",
    "answers": AnswerPolicy(TAXONOMY, None, 0.6).to_dict(),
}


@pytest.fixture
def job(tmp_path: Path, clean_pg: Engine) -> int:
    """One capture with a sure pterophorid (its own label, a family) and an arctiid and a
    ctenuchid too alike to tell (rolled up to their family, Erebidae), tracked: the second
    box is the sighting of one occurrence."""
    factory = make_sessionmaker(clean_pg)
    with factory.begin() as s:
        dep = get_or_create_deployment(s, "night-9")
        set_metadata(s, "night-9", DeploymentMetadata(latitude=46.8, longitude=-71.2,
                                                       capture_method="activityDetection"))
        insert_captures(s, dep, [{"uri": str(tmp_path / "a.jpg"),
                                  "captured_at": datetime(2024, 7, 1, 23, tzinfo=UTC),
                                  "width": 1000, "height": 1000}])
        job_id = create_job(s, dep, pipeline=PIPELINE, fingerprint="cd" * 32,
                            chunk_size=1).job_id
        capture_id = s.scalar(select(Capture.id))
    sure = Classification("demo_classifier", "pterophorid", 0.95,
                          [("pterophorid", 0.95), ("pyralid", 0.03)], rank="family")
    rolled = Classification("demo_classifier", "Erebidae", 0.81,
                            [("arctiid", 0.45), ("ctenuchid", 0.36)], rank="family",
                            source="rolled-up")
    with factory.begin() as s:
        write_results(s, job_id, [ItemResult(capture_id, str(tmp_path / "a.jpg"), 1000, 1000, [
            Detection(100, 100, 300, 300, 0.9, "insect", [sure]),
            Detection(500, 500, 700, 700, 0.8, "insect", [rolled]),
        ])])
    at = datetime(2024, 7, 1, 23, tzinfo=UTC)
    with factory.begin() as s:
        occurrence = Occurrence(job_id=job_id, deployment_id=dep, night=date(2024, 7, 1),
                                first_capture_id=capture_id, last_capture_id=capture_id,
                                first_at=at, last_at=at, n_detections=1, label="Erebidae",
                                score=0.81)
        s.add(occurrence)
        s.flush()
        s.execute(update(DetectionRow).where(DetectionRow.x1 == 500)
                  .values(occurrence_id=occurrence.id))
    return job_id


def test_exports_name_answers_at_their_rank_and_validate(
    tmp_path: Path, service_env: dict[str, str], job: int
) -> None:
    package = _export(service_env, job, "camtrapdp", tmp_path / "package", *CAMTRAP_OPTIONS)
    descriptor = json.loads((package / "datapackage.json").read_text())
    jsonschema.validate(descriptor, json.loads((CAMTRAP / "camtrap-dp-profile.json").read_text()))
    assert descriptor["taxonomic"] == [
        {"scientificName": "Erebidae", "taxonRank": "family", "order": "Lepidoptera"},
        {"scientificName": "Pterophoridae", "taxonRank": "family", "order": "Lepidoptera"},
    ]
    del descriptor["profile"]
    for resource in descriptor["resources"]:
        resource["schema"] = json.loads(
            (CAMTRAP / f"{resource['name']}-table-schema.json").read_text())
    report = Package(descriptor, basepath=str(package)).validate()
    assert report.valid, report.flatten(["rowNumber", "fieldName", "type", "note"])
    assert descriptor["project"]["observationLevel"] == ["media", "event"]
    observations = read_csv(package / "observations.csv")
    assert [(o["observationLevel"], o["scientificName"], o["classificationProbability"],
             o["classificationMethod"], o["eventID"]) for o in observations] == [
        ("media", "Pterophoridae", "0.95", "machine", ""),
        ("media", "Erebidae", "0.81", "machine", observations[2]["eventID"]),
        ("event", "Erebidae", "0.81", "machine", observations[2]["observationID"]),
    ]

    rows = read_csv(_export(service_env, job, "csv", tmp_path / "d.csv"))
    assert [(r["demo_classifier_label"], r["demo_classifier_rank"],
             r["demo_classifier_source"]) for r in rows] == [
        ("pterophorid", "family", "classifier"), ("Erebidae", "family", "rolled-up")]
    lines = _export(service_env, job, "jsonl", tmp_path / "d.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["classifications"]["demo_classifier"] == {
        "label": "Erebidae", "score": 0.81, "rank": "family", "prediction_source": "rolled-up"}

    md = json.loads(_export(service_env, job, "megadetector", tmp_path / "md.json").read_text())
    jsonschema.validate(md, json.loads((SCHEMAS / "megadetector-batch-output.schema.json")
                                       .read_text()))
    names = md["classification_categories"]
    first, second = md["images"][0]["detections"]
    assert [names[c] for c, _ in first["classifications"]] == ["Pterophoridae", "Pyralidae"]
    assert [names[c] for c, _ in second["classifications"]] == [
        "Erebidae", "Arctiinae", "Ctenuchina"]

    coco = json.loads(_export(service_env, job, "coco", tmp_path / "coco.json").read_text())
    categories = {c["id"]: c for c in coco["categories"]}
    answered = [categories[a["category_id"]] for a in coco["annotations"]]
    assert [(c["name"], c["supercategory"]) for c in answered] == [
        ("Pterophoridae", "Pterophoroidea"), ("Erebidae", "Noctuoidea")]


def _export(env: dict[str, str], job: int, fmt: str, out: Path, *extra: str) -> Path:
    done = trapq(env, "export", str(job), "--format", fmt, "-o", str(out), *extra)
    assert done.returncode == 0, done.stderr
    return out

