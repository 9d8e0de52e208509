"""`trapq export` in the field's formats, checked against the formats' own rules.

Camtrap DP 1.0.2 is validated by frictionless against table schemas written from the
standard's field definitions (tests/schemas/camtrapdp-1.0.2), MegaDetector batch output
against a JSON Schema written from its format document, COCO by pycocotools itself.
The job's results go in through the job store's own write path (db.results.write_results).
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest
from frictionless import Package
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from sqlalchemy import Engine, select

import migrations
from db.deployments import DeploymentMetadata, set_metadata
from db.imports import get_or_create_deployment, insert_captures
from db.jobs import create_job
from db.models import Capture
from db.results import write_results
from db.session import make_engine, make_sessionmaker
from inference.types import Classification, Detection, ErrorKind, ItemResult
from tests.trapq_cli import one_line_error, trapq

SCHEMAS = Path(__file__).parent / "schemas"
CAMTRAP = SCHEMAS / "camtrapdp-1.0.2"
FINGERPRINT = "ab" * 32
PIPELINE = {
    "detector": {"name": "moth_detector", "labels": ["insect"], "sha256": "1" * 64,
                 "input_size": [800, 1333], "weights": "d.pt"},
    "classifier": {"name": "moth_species", "labels": ["Noctua pronuba", "Agrotis exclamationis",
                                                      "Autographa gamma"],
                   "sha256": "2" * 64, "input_size": [224, 224], "weights": "c.pt"},
    "filter": {"name": "moth_filter", "labels": ["moth", "nonmoth"], "sha256": "3" * 64,
               "input_size": [224, 224], "weights": "f.pt"},
    "box_threshold": 0.5,
    "top_k": 3,
    "filter_negative_label": "nonmoth",
}
CAMTRAP_OPTIONS = (
    "--project-title", "Garden moths", "--sampling-design", "opportunistic",
    "--contributor", "contact:Ada Lovelace <ada@example.org>", "--contributor", "Trap Lab",
)


@dataclass(frozen=True)
class Made:
    job_id: int
    ids: dict[str, int]  # capture name -> id
    root: Path


def species(label: str, score: float, *others: tuple[str, float]) -> list[Classification]:
    return [
        Classification("moth_filter", "moth", 0.99, [("moth", 0.99), ("nonmoth", 0.01)]),
        Classification("moth_species", label, score, [(label, score), *others]),
    ]


@pytest.fixture
def made(tmp_path: Path, clean_pg: Engine) -> Made:
    return make_export_job(clean_pg, tmp_path / "night-1")


def make_export_job(engine: Engine, root: Path) -> Made:
    """A job of four 4000x3000 captures: two moths (one sure, one not), a blank, a non-moth
    and a missing file; plus a capture still pending."""
    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]
    factory = make_sessionmaker(engine)
    with factory.begin() as s:
        dep = get_or_create_deployment(s, "night-1")
        set_metadata(s, "night-1", DeploymentMetadata(
            latitude=52.37, longitude=4.89, capture_method="timeLapse",
            deployment_start=datetime(2024, 6, 1, 21, tzinfo=UTC),
            deployment_end=datetime(2024, 6, 2, 5, tzinfo=UTC), camera_model="Canon-EOS 90D",
        ))
        insert_captures(s, dep, [
            {"uri": str(root / n), "captured_at": datetime(2024, 6, 1, 22, i, tzinfo=UTC),
             "width": None, "height": None}
            for i, n in enumerate(names)
        ])
        plan = create_job(s, dep, pipeline=PIPELINE, fingerprint=FINGERPRINT, chunk_size=10)
        ids = dict(s.execute(select(Capture.uri, Capture.id)).all())
    ids = {Path(uri).name: cid for uri, cid in ids.items()}
    sure = Detection(400, 300, 800, 900, 0.97, "insect",
                     species("Noctua pronuba", 0.91, ("Agrotis exclamationis", 0.06)))
    unsure = Detection(2000, 1500, 2400, 1800, 0.8, "insect",
                       species("Autographa gamma", 0.3, ("Noctua pronuba", 0.25)))
    nonmoth = Detection(10, 20, 110, 220, 0.7, "insect",
                        [Classification("moth_filter", "nonmoth", 0.9, [("nonmoth", 0.9)])])
    results = [
        ItemResult(ids["a.jpg"], str(root / "a.jpg"), 4000, 3000, [sure, unsure]),
        ItemResult(ids["b.jpg"], str(root / "b.jpg"), 4000, 3000, []),
        ItemResult(ids["c.jpg"], str(root / "c.jpg"), 4000, 3000, [nonmoth]),
        ItemResult(ids["d.jpg"], str(root / "d.jpg"), error_kind=ErrorKind.MISSING,
                   error=f"no such file: {root / 'd.jpg'}"),
    ]
    with factory.begin() as s:
        write_results(s, plan.job_id, results)
    return Made(plan.job_id, ids, root)


def export(env: dict[str, str], made: Made, fmt: str, out: Path, *extra: str) -> None:
    done = trapq(env, "export", str(made.job_id), "--format", fmt, "-o", str(out), *extra)
    assert done.returncode == 0, done.stderr


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_camtrapdp_package_is_valid_against_the_1_0_2_schemas_with_one_row_per_fact(
    tmp_path: Path, service_env: dict[str, str], made: Made
) -> None:
    out = tmp_path / "package"
    export(service_env, made, "camtrapdp", out, *CAMTRAP_OPTIONS, "--root", str(made.root))

    descriptor = json.loads((out / "datapackage.json").read_text())
    jsonschema.validate(
        descriptor, json.loads((CAMTRAP / "camtrap-dp-profile.json").read_text()),
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )
    del descriptor["profile"]  # checked above; frictionless would fetch it from the web
    for resource in descriptor["resources"]:  # the published URLs, swapped for our copies
        resource["schema"] = json.loads(
            (CAMTRAP / f"{resource['name']}-table-schema.json").read_text())
    report = Package(descriptor, basepath=str(out)).validate()
    assert report.valid, report.flatten(["rowNumber", "fieldName", "type", "note"])
    spoiled = tmp_path / "spoiled"  # the same package with values Camtrap DP forbids
    shutil.copytree(out, spoiled)
    text = (spoiled / "observations.csv").read_text()
    (spoiled / "observations.csv").write_text(
        text.replace(",animal,", ",mammal,").replace(",0.1,0.1,0.1,0.2,", ",1.5,0.1,0.1,0.2,"))
    errors = Package(descriptor, basepath=str(spoiled)).validate().flatten(["fieldName", "type"])
    assert ["observationType", "constraint-error"] in errors
    assert ["bboxX", "constraint-error"] in errors

    media = {r["mediaID"]: r for r in read_csv(out / "media.csv")}
    assert len(media) == 5
    a = media[str(made.ids["a.jpg"])]
    assert (a["captureMethod"], a["timestamp"], a["filePath"], a["fileMediatype"]) == (
        "timeLapse", "2024-06-01T22:00:00Z", "a.jpg", "image/jpeg")
    assert "no such file" in media[str(made.ids["d.jpg"])]["mediaComments"]
    assert media[str(made.ids["e.jpg"])]["mediaComments"] == "not processed yet"

    obs = read_csv(out / "observations.csv")
    by_media: dict[str, list[dict[str, str]]] = {}
    for row in obs:
        by_media.setdefault(row["mediaID"], []).append(row)
    sure, unsure = by_media[str(made.ids["a.jpg"])]
    assert (sure["observationType"], sure["scientificName"]) == ("animal", "Noctua pronuba")
    assert [float(sure[k]) for k in ("bboxX", "bboxY", "bboxWidth", "bboxHeight")] == [
        0.1, 0.1, 0.1, 0.2]
    assert float(sure["classificationProbability"]) == 0.91
    assert sure["classificationMethod"] == "machine" and sure["observationLevel"] == "media"
    assert sure["classifiedBy"] == (
        f"moth_detector + moth_filter + moth_species (trapq pipeline {FINGERPRINT})")
    assert (unsure["observationType"], unsure["scientificName"]) == ("unknown", "")
    assert [r["observationType"] for r in by_media[str(made.ids["b.jpg"])]] == ["blank"]
    assert [r["observationType"] for r in by_media[str(made.ids["c.jpg"])]] == ["unclassified"]
    assert str(made.ids["d.jpg"]) not in by_media  # failed: not processed, so no observation
    assert str(made.ids["e.jpg"]) not in by_media

    assert descriptor["taxonomic"] == [{"scientificName": "Noctua pronuba"}]
    assert descriptor["project"]["captureMethod"] == ["timeLapse"]
    assert descriptor["project"]["observationLevel"] == ["media"]
    assert descriptor["temporal"] == {"start": "2024-06-01", "end": "2024-06-02"}
    assert descriptor["spatial"] == {"type": "Point", "coordinates": [4.89, 52.37]}
    assert descriptor["contributors"][0] == {
        "title": "Ada Lovelace", "role": "contact", "email": "ada@example.org"}
    (dep,) = read_csv(out / "deployments.csv")
    assert (dep["deploymentID"], dep["latitude"], dep["cameraModel"]) == (
        "night-1", "52.37", "Canon-EOS 90D")


def test_exports_of_an_embedded_sqlite_store_give_the_same_utc_times_in_any_local_zone(
    tmp_path: Path, service_env: dict[str, str], made: Made, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SQLite keeps no offset: a time read back naive and taken as local time would shift by
    the machine's zone. Exported from both stores, in a process 5 hours west of UTC."""
    sqlite_url = f"sqlite:///{tmp_path / 'embedded' / 'trapq.db'}"
    (tmp_path / "embedded").mkdir()
    migrations.upgrade(sqlite_url)
    embedded = make_engine(sqlite_url)
    try:
        lite = make_export_job(embedded, made.root)
    finally:
        embedded.dispose()
    sqlite_env = dict(service_env, TRAPQ_DATABASE_URL=sqlite_url)
    monkeypatch.setenv("TZ", "America/Bogota")  # UTC-5 all year
    time.tzset()
    try:
        for env, job, out in ((service_env, made, tmp_path / "pg"),
                              (sqlite_env, lite, tmp_path / "sqlite")):
            export(env, job, "camtrapdp", out, *CAMTRAP_OPTIONS, "--root", str(made.root))
            export(env, job, "coco", out / "coco.json", "--root", str(made.root))
    finally:
        monkeypatch.undo()
        time.tzset()
    for out in (tmp_path / "pg", tmp_path / "sqlite"):
        times = {r["filePath"]: r["timestamp"] for r in read_csv(out / "media.csv")}
        assert times["a.jpg"] == "2024-06-01T22:00:00Z" and times["b.jpg"] == "2024-06-01T22:01:00Z"
        (deployment,) = read_csv(out / "deployments.csv")
        assert (deployment["deploymentStart"], deployment["deploymentEnd"]) == (
            "2024-06-01T21:00:00Z", "2024-06-02T05:00:00Z")
        coco = json.loads((out / "coco.json").read_text())
        dates = {img["file_name"]: img["date_captured"] for img in coco["images"]}
        assert dates["a.jpg"] == "2024-06-01T22:00:00Z"


def test_camtrapdp_says_in_one_line_what_must_be_given(
    tmp_path: Path, service_env: dict[str, str], made: Made, clean_pg: Engine
) -> None:
    out = str(tmp_path / "p")
    job = str(made.job_id)
    no_project = trapq(service_env, "export", job, "--format", "camtrapdp", "-o", out)
    no_design = trapq(service_env, "export", job, "--format", "camtrapdp", "-o", out,
                      "--project-title", "T", "--contributor", "A")
    no_dir = trapq(service_env, "export", job, "--format", "camtrapdp")
    with make_sessionmaker(clean_pg).begin() as s:
        s.execute(Capture.__table__.update().values(captured_at=None).where(
            Capture.id == made.ids["b.jpg"]))
    no_time = trapq(service_env, "export", job, "--format", "camtrapdp", "-o", out,
                    *CAMTRAP_OPTIONS)

    assert "--project-title" in one_line_error(no_project)
    assert "--sampling-design" in one_line_error(no_design)
    assert "-o DIR" in one_line_error(no_dir)
    assert "1 captures of job" in one_line_error(no_time)


def test_camtrapdp_needs_the_deployment_location(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine
) -> None:
    factory = make_sessionmaker(clean_pg)
    with factory.begin() as s:
        dep = get_or_create_deployment(s, "nowhere")
        insert_captures(s, dep, [{"uri": "/x/a.jpg", "captured_at": datetime.now(UTC),
                                  "width": 10, "height": 10}])
        job = create_job(s, dep, pipeline=PIPELINE, fingerprint=FINGERPRINT, chunk_size=1).job_id
    done = trapq(service_env, "export", str(job), "--format", "camtrapdp",
                 "-o", str(tmp_path / "p"), *CAMTRAP_OPTIONS)
    assert "trapq deployments set nowhere --lat LAT --lon LON" in one_line_error(done)


def test_megadetector_output_follows_the_batch_format_rules(
    tmp_path: Path, service_env: dict[str, str], made: Made
) -> None:
    out = tmp_path / "md.json"
    export(service_env, made, "megadetector", out, "--root", str(made.root))

    doc = json.loads(out.read_text())
    jsonschema.validate(doc, json.loads((SCHEMAS / "megadetector-batch-output.schema.json")
                                        .read_text()))
    assert doc["info"]["format_version"] == "1.5"
    assert (doc["info"]["detector"], doc["info"]["classifier"]) == ("moth_detector",
                                                                    "moth_species")
    assert doc["detection_categories"] == {"1": "insect"}
    assert doc["classification_categories"] == {
        "0": "Noctua pronuba", "1": "Agrotis exclamationis", "2": "Autographa gamma"}
    images = {image["file"]: image for image in doc["images"]}
    assert sorted(images) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]  # e.jpg is still pending
    sure, unsure = images["a.jpg"]["detections"]
    assert sure == {"category": "1", "conf": 0.97, "bbox": [0.1, 0.1, 0.1, 0.2],
                    "classifications": [["0", 0.91], ["1", 0.06]]}
    assert unsure["classifications"] == [["2", 0.3], ["0", 0.25]]
    for image in doc["images"]:
        for d in image["detections"] or []:
            scores = [conf for _, conf in d.get("classifications", [])]
            assert scores == sorted(scores, reverse=True)
    assert images["b.jpg"]["detections"] == []
    assert "classifications" not in images["c.jpg"]["detections"][0]
    assert images["d.jpg"]["detections"] is None and "no such file" in images["d.jpg"]["failure"]


def coco_ap(truth: COCO, found: list[dict[str, object]]) -> float:
    """pycocotools' AP@[.5:.95] of `found` (xywh boxes with scores) against `truth`."""
    evaluation = COCOeval(truth, truth.loadRes(found), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return float(evaluation.stats[0])


def test_coco_round_trips_through_pycocotools_and_its_boxes_score_ap_1_against_the_truth(
    tmp_path: Path, service_env: dict[str, str], made: Made
) -> None:
    out = tmp_path / "coco.json"
    export(service_env, made, "coco", out, "--root", str(made.root))

    exported = COCO(str(out))
    assert sorted(img["file_name"] for img in exported.dataset["images"]) == [
        "a.jpg", "b.jpg", "c.jpg"]
    assert {img["width"] for img in exported.dataset["images"]} == {4000}
    names = {c["id"]: c["name"] for c in exported.loadCats(exported.getCatIds())}
    boxes = {(names[a["category_id"]], *a["bbox"]) for a in exported.dataset["annotations"]}
    assert boxes == {("Noctua pronuba", 400, 300, 400, 600),
                     ("Autographa gamma", 2000, 1500, 400, 300), ("insect", 10, 20, 100, 200)}

    # The truth is written here from the boxes `made` wrote, in pixels (x1, y1, x2, y2),
    # not read back from the export: pycocotools scores the export's annotations against it.
    image_of = {img["file_name"]: img["id"] for img in exported.dataset["images"]}
    category_of = {name: cid for cid, name in names.items()}
    written = [("a.jpg", "Noctua pronuba", (400, 300, 800, 900)),
               ("a.jpg", "Autographa gamma", (2000, 1500, 2400, 1800)),
               ("c.jpg", "insect", (10, 20, 110, 220))]
    truth = COCO()
    truth.dataset = {
        "images": exported.dataset["images"],
        "categories": exported.dataset["categories"],
        "annotations": [
            {"id": i + 1, "image_id": image_of[f], "category_id": category_of[c],
             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
            for i, (f, c, (x1, y1, x2, y2)) in enumerate(written)
        ],
    }
    truth.createIndex()
    found = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
              "score": a.get("score", 1.0)} for a in exported.dataset["annotations"]]
    assert coco_ap(truth, found) == pytest.approx(1.0)
    # The check can fail: the same boxes read as (x1, y1, x2, y2), the usual slip, score low.
    as_corners = [dict(f, bbox=[x, y, x + w, y + h]) for f in found
                  for x, y, w, h in [f["bbox"]]]
    assert coco_ap(truth, as_corners) < 0.5


def test_unknown_format_and_job_are_one_line_errors(
    service_env: dict[str, str], made: Made
) -> None:
    bad = trapq(service_env, "export", str(made.job_id), "--format", "xml")
    missing = trapq(service_env, "export", "999", "--format", "coco")
    assert "use one of csv, jsonl, camtrapdp, megadetector, coco" in one_line_error(bad)
    assert "no job 999" in one_line_error(missing)
