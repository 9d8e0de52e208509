"""Camtrap DP 1.0.2: datapackage.json with deployments.csv, media.csv and observations.csv.

One media row per capture of the job. Observations are media-level: one per detection
(`animal`, or `unknown` below --min-probability, or `unclassified` where the species
classifier gave nothing), and one `blank` per processed capture with no detection, so "looked
and found nothing" differs from "not processed" (no observation; media.mediaComments says why).
Once the job is tracked, each occurrence (one individual followed across captures) is an
event: its detections' media observations carry its eventID, and it has an event-level
observation of its own (its voted answer, first and last time); the package lists both levels.
With a taxonomy, scientificName is the scientific name of the answer at the rank it reached
(`Pterophoridae` for the label `pterophorid`, `Erebidae` for a roll-up), and the package's
`taxonomic` list gives each its rank, its higher taxa and its GBIF key as taxonID.

media.csv and observations.csv are written in one streamed pass over the job's results;
datapackage.json last, once the taxa seen are known.
"""

from __future__ import annotations

import csv
import json
import mimetypes
import uuid
from collections.abc import Iterator
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from db.export_rows import CaptureRecord, JobContext, JobCounts, capture_records
from db.models import Deployment
from db.occurrences import occurrence_rows
from db.states import ItemState
from tasks.errors import UserError
from tasks.exports.common import (
    ExportOptions,
    JobModels,
    file_of,
    local_path,
    normalized_box,
    utc_z,
    utcnow,
)

VERSION = "1.0.2"
PROFILE = f"https://raw.githubusercontent.com/tdwg/camtrap-dp/{VERSION}/camtrap-dp-profile.json"
SAMPLING_DESIGNS = (
    "simpleRandom", "systematicRandom", "clusteredRandom", "experimental", "targeted",
    "opportunistic",
)
CONTRIBUTOR_ROLES = ("contact", "principalInvestigator", "rightsHolder", "publisher", "contributor")

DEPLOYMENT_FIELDS = (
    "deploymentID", "locationID", "locationName", "latitude", "longitude",
    "coordinateUncertainty", "deploymentStart", "deploymentEnd", "setupBy", "cameraID",
    "cameraModel", "cameraDelay", "cameraHeight", "cameraDepth", "cameraTilt", "cameraHeading",
    "detectionDistance", "timestampIssues", "baitUse", "featureType", "habitat",
    "deploymentGroups", "deploymentTags", "deploymentComments",
)
MEDIA_FIELDS = (
    "mediaID", "deploymentID", "captureMethod", "timestamp", "filePath", "filePublic",
    "fileName", "fileMediatype", "exifData", "favorite", "mediaComments",
)
OBSERVATION_FIELDS = (
    "observationID", "deploymentID", "mediaID", "eventID", "eventStart", "eventEnd",
    "observationLevel", "observationType", "cameraSetupType", "scientificName", "count",
    "lifeStage", "sex", "behavior", "individualID", "individualPositionRadius",
    "individualPositionAngle", "individualSpeed", "bboxX", "bboxY", "bboxWidth", "bboxHeight",
    "classificationMethod", "classifiedBy", "classificationTimestamp",
    "classificationProbability", "observationTags", "observationComments",
)
TABLES = {"deployments": DEPLOYMENT_FIELDS, "media": MEDIA_FIELDS,
          "observations": OBSERVATION_FIELDS}
DECIMALS = 6

# taxonomic[].taxonRank and the higher-taxon terms take these ranks only.
TAXON_RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species", "subspecies")
GBIF_TAXON = "https://www.gbif.org/species/{}"



def write_camtrapdp(
    session: Session,
    ctx: JobContext,
    counts: JobCounts,
    options: ExportOptions,
    out_dir: Path,
) -> str:
    dep = ctx.deployment
    project = _project(ctx, options)
    contributors = [_contributor(text) for text in options.contributors]
    start = dep.deployment_start or counts.first
    end = dep.deployment_end or counts.last
    assert start is not None and end is not None  # captures all have times (checked below)
    models = JobModels.of(ctx.pipeline)
    named = f"{models.pipeline}, " if models.pipeline else ""
    classified_by = f"{models.names()} (trapq pipeline {named}{models.fingerprint})"
    out_dir.mkdir(parents=True, exist_ok=True)
    taxa: set[str] = set()
    levels: list[str] = []
    with _TableFile(out_dir, "deployments") as deployments:
        deployments.writerow(_deployment_row(dep, start, end))
    n_media = n_obs = 0
    with _TableFile(out_dir, "media") as media, _TableFile(out_dir, "observations") as observations:
        for record in capture_records(session, ctx.job_id):
            media.writerow(_media_row(record, dep, options))
            n_media += 1
            for row in _media_observations(record, dep, models, classified_by, options):
                observations.writerow(row)
                n_obs += 1
                if row["scientificName"]:
                    taxa.add(row["scientificName"])
                if "media" not in levels:
                    levels.append("media")
        for row in _occurrence_observations(session, ctx, models, classified_by):
            observations.writerow(row)
            n_obs += 1
            taxa.add(row["scientificName"])
            if "event" not in levels:
                levels.append("event")
    package = {
        "resources": [
            {
                "name": name,
                "path": f"{name}.csv",
                "profile": "tabular-data-resource",
                "format": "csv",
                "mediatype": "text/csv",
                "encoding": "utf-8",
                "schema": (f"https://raw.githubusercontent.com/tdwg/camtrap-dp/{VERSION}/"
                           f"{name}-table-schema.json"),
            }
            for name in TABLES
        ],
        "profile": PROFILE,
        "name": f"trapq-job-{ctx.job_id}",
        "id": str(uuid.uuid4()),
        "created": utc_z(utcnow()),
        "title": options.title or f"{dep.name}: {models.names()} (trapq job {ctx.job_id})",
        "contributors": contributors,
        "sources": [{"title": "trapq", "version": _trapq_version()}],
        "project": project | {"observationLevel": levels or ["media"]},
        "spatial": {"type": "Point", "coordinates": [dep.longitude, dep.latitude]},
        "temporal": {"start": start.date().isoformat(), "end": end.date().isoformat()},
        "taxonomic": [_taxon_entry(name, models) for name in sorted(taxa)],
    }
    (out_dir / "datapackage.json").write_text(json.dumps(package, indent=2) + "\n")
    return f"{n_media} media, {n_obs} observations"


def check_camtrapdp(ctx: JobContext, counts: JobCounts, options: ExportOptions) -> None:
    """Everything Camtrap DP requires that trapq cannot know, as one line naming how to give it."""
    dep = ctx.deployment
    if dep.latitude is None or dep.longitude is None:
        raise UserError(
            f"Camtrap DP needs the location of deployment {dep.name!r}: "
            f"`trapq deployments set {dep.name} --lat LAT --lon LON`"
        )
    if dep.capture_method is None:
        raise UserError(
            f"Camtrap DP needs how deployment {dep.name!r} captured: `trapq deployments set "
            f"{dep.name} --capture-method activityDetection|timeLapse`"
        )
    if counts.without_time:
        raise UserError(
            f"{counts.without_time} captures of job {ctx.job_id} have no timestamp, which "
            "Camtrap DP requires; import them again from a manifest with a captured_at column"
        )
    if not options.project_title:
        raise UserError("Camtrap DP needs --project-title (the study the data belong to)")
    if options.sampling_design not in SAMPLING_DESIGNS:
        raise UserError(f"Camtrap DP needs --sampling-design: one of {', '.join(SAMPLING_DESIGNS)}")
    if not options.contributors:
        raise UserError(
            "Camtrap DP needs at least one --contributor 'Name <email>' "
            "(optionally ROLE:Name, ROLE one of " + ", ".join(CONTRIBUTOR_ROLES) + ")"
        )
    for text in options.contributors:
        _contributor(text)


def _project(ctx: JobContext, options: ExportOptions) -> dict[str, Any]:
    return {
        "title": options.project_title,
        "samplingDesign": options.sampling_design,
        "captureMethod": [ctx.deployment.capture_method],
        "individualAnimals": False,
    }


def _contributor(text: str) -> dict[str, str]:
    """`[ROLE:]Name [<email>]` to a Data Package contributor."""
    role = "contributor"
    head, sep, rest = text.partition(":")
    if sep and head in CONTRIBUTOR_ROLES:
        role, text = head, rest
    elif sep and " " not in head and "<" not in head:
        raise UserError(f"--contributor {text!r}: role {head!r} is not one of "
                        + ", ".join(CONTRIBUTOR_ROLES))
    name, _, email = text.partition("<")
    contributor = {"title": name.strip(), "role": role}
    if not contributor["title"]:
        raise UserError(f"--contributor {text!r} has no name")
    if email.strip():
        contributor["email"] = email.strip().rstrip(">").strip()
    return contributor


def _deployment_row(dep: Deployment, start: datetime, end: datetime) -> dict[str, Any]:
    return {
        "deploymentID": dep.name,
        "locationID": dep.location_id,
        "locationName": dep.location_name,
        "latitude": dep.latitude,
        "longitude": dep.longitude,
        "coordinateUncertainty": dep.coordinate_uncertainty_m,
        "deploymentStart": utc_z(start),
        "deploymentEnd": utc_z(end),
        "setupBy": dep.setup_by,
        "cameraID": dep.camera_id,
        "cameraModel": dep.camera_model,
        "cameraHeight": dep.camera_height_m,
        "habitat": dep.habitat,
        "deploymentComments": dep.comments,
    }


def _media_row(record: CaptureRecord, dep: Deployment, options: ExportOptions) -> dict[str, Any]:
    path = local_path(record.uri)
    relative = file_of(record.uri, options.root)
    if relative != record.uri:
        file_path = relative
    elif path is not None:
        file_path = path.absolute().as_uri()
    else:
        file_path = record.uri
    name = record.uri.rstrip("/").rsplit("/", 1)[-1]
    mediatype = mimetypes.guess_type(name)[0] or ""
    assert record.captured_at is not None  # check_camtrapdp refused captures without a time
    row: dict[str, Any] = {
        "mediaID": str(record.capture_id),
        "deploymentID": dep.name,
        "captureMethod": dep.capture_method,
        "timestamp": utc_z(record.captured_at),
        "filePath": file_path,
        "filePublic": "true" if options.public_media else "false",
        "fileName": name,
        "fileMediatype": mediatype if mediatype.startswith("image/") else "image/jpeg",
    }
    if record.state == ItemState.FAILED.value:
        row["mediaComments"] = f"not processed: {record.error}"
    elif record.state == ItemState.PENDING.value:
        row["mediaComments"] = "not processed yet"
    return row


def _media_observations(
    record: CaptureRecord,
    dep: Deployment,
    models: JobModels,
    classified_by: str,
    options: ExportOptions,
) -> Iterator[dict[str, Any]]:
    if record.state != ItemState.DONE.value:
        return
    assert record.captured_at is not None
    at = utc_z(record.captured_at)
    common = {
        "deploymentID": dep.name,
        "mediaID": str(record.capture_id),
        "eventStart": at,
        "eventEnd": at,
        "observationLevel": "media",
        "classificationMethod": "machine",
        "classifiedBy": classified_by,
        "classificationTimestamp": utc_z(record.finished_at) if record.finished_at else None,
    }
    if not record.detections:
        yield common | {"observationID": f"{record.capture_id}-blank",
                        "observationType": "blank", "scientificName": None}
        return
    for d in record.detections:
        species = models.species(d)
        row = common | {"observationID": f"{record.capture_id}-{d.id}", "count": 1}
        if d.occurrence_id is not None:
            row["eventID"] = _event_id(d.occurrence_id)
        if species is None:
            row |= {"observationType": "unclassified", "scientificName": None}
        else:
            confident = species.score >= options.min_probability
            row |= {
                "observationType": "animal" if confident else "unknown",
                "scientificName": models.scientific_name(species.label) if confident else None,
                "classificationProbability": round(species.score, DECIMALS),
            }
        box = normalized_box(d, record.width, record.height)
        if box is not None:
            row |= dict(zip(("bboxX", "bboxY", "bboxWidth", "bboxHeight"),
                            (round(v, DECIMALS) for v in box), strict=True))
        yield row


def _event_id(occurrence_id: int) -> str:
    return f"occurrence-{occurrence_id}"


def _occurrence_observations(
    session: Session, ctx: JobContext, models: JobModels, classified_by: str
) -> Iterator[dict[str, Any]]:
    """One event-level observation per occurrence of the job (none before it is tracked)."""
    for occ in occurrence_rows(session, ctx.job_id):
        first, last = occ["first_at"], occ["last_at"]
        yield {
            "observationID": _event_id(occ["occurrence_id"]),
            "deploymentID": ctx.deployment.name,
            "eventID": _event_id(occ["occurrence_id"]),
            "eventStart": utc_z(first),
            "eventEnd": utc_z(last),
            "observationLevel": "event",
            "observationType": "animal",
            "scientificName": models.scientific_name(occ["label"]),
            "count": 1,
            "classificationMethod": "machine",
            "classifiedBy": classified_by,
            "classificationProbability": round(occ["score"], DECIMALS),
        }


def _taxon_entry(name: str, models: JobModels) -> dict[str, Any]:
    """A scientific name of the observations, with what the job's taxonomy says of it."""
    entry: dict[str, Any] = {"scientificName": name}
    taxonomy = models.taxonomy
    found = [t for t in taxonomy.taxa if t.scientific_name == name] if taxonomy else []
    if not found or taxonomy is None:
        return entry
    taxon = found[0]
    if taxon.gbif_key is not None:
        entry["taxonID"] = GBIF_TAXON.format(taxon.gbif_key)
    if taxon.rank in TAXON_RANKS:
        entry["taxonRank"] = taxon.rank
    for higher in taxonomy.lineage(taxon.name)[1:]:
        if higher.rank in TAXON_RANKS and higher.rank not in ("species", "subspecies"):
            entry[higher.rank] = higher.scientific_name
    return entry


class _TableFile:
    """A CSV of one Camtrap DP table, header first; missing keys are written empty."""

    def __init__(self, out_dir: Path, name: str) -> None:
        self.path = out_dir / f"{name}.csv"
        self.fields = TABLES[name]

    def __enter__(self) -> csv.DictWriter[str]:
        self._file = self.path.open("w", newline="", encoding="utf-8")
        writer = csv.DictWriter(self._file, fieldnames=self.fields, extrasaction="raise")
        writer.writeheader()
        return writer

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def _trapq_version() -> str:
    try:
        return version("trapq")
    except PackageNotFoundError:
        return "unknown"
