"""MegaDetector batch output JSON (format 1.5), what Timelapse and AddaxAI read.

Images stream out one by one; the category tables follow them (JSON objects have no key order
to keep), so a label no model file lists still gets an id as it is met.
"""

from __future__ import annotations

import json
from typing import Any, TextIO

from sqlalchemy.orm import Session

from db.export_rows import CaptureRecord, JobContext, capture_records
from db.states import ItemState
from tasks.exports.common import ExportOptions, JobModels, LabelIds, file_of, normalized_box

FORMAT_VERSION = "1.5"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
DECIMALS = 4


def write_megadetector(
    session: Session, ctx: JobContext, options: ExportOptions, out: TextIO
) -> str:
    models = JobModels.of(ctx.pipeline)
    detection_ids = LabelIds(models.detector_labels, first_id=1)  # "0" is informally "empty"
    classification_ids = LabelIds(
        tuple(models.scientific_name(label) for label in models.classifier_labels), first_id=0
    )
    out.write('{"info": ' + json.dumps(_info(ctx, models)) + ', "images": [')
    n_images = n_failed = 0
    for record in capture_records(session, ctx.job_id):
        if record.state == ItemState.PENDING.value:
            continue  # not looked at yet: neither found nothing nor failed
        image = _image(record, models, options, detection_ids, classification_ids)
        out.write((",\n" if n_images else "\n") + json.dumps(image))
        n_images += 1
        n_failed += record.state == ItemState.FAILED.value
    out.write("\n]")
    out.write(', "detection_categories": ' + json.dumps(_table(detection_ids)))
    out.write(', "classification_categories": ' + json.dumps(_table(classification_ids)))
    out.write("}\n")
    return f"{n_images} images ({n_failed} failed)"


def _info(ctx: JobContext, models: JobModels) -> dict[str, Any]:
    info: dict[str, Any] = {"format_version": FORMAT_VERSION, "detector": models.detector}
    finished = ctx.finished_at.strftime(TIME_FORMAT) if ctx.finished_at else None
    if finished:
        info["detection_completion_time"] = finished
    info["classifier"] = models.classifier
    if finished:
        info["classification_completion_time"] = finished
    info["detector_metadata"] = {"typical_detection_threshold": models.box_threshold}
    info["trapq"] = {"job": ctx.job_id, "pipeline": models.pipeline,
                     "pipeline_fingerprint": models.fingerprint}
    return info


def _image(
    record: CaptureRecord,
    models: JobModels,
    options: ExportOptions,
    detection_ids: LabelIds,
    classification_ids: LabelIds,
) -> dict[str, Any]:
    image: dict[str, Any] = {"file": file_of(record.uri, options.root)}
    if record.state == ItemState.FAILED.value:
        image["failure"] = record.error or "failed"
        image["detections"] = None
        return image
    detections = []
    for d in record.detections:
        box = normalized_box(d, record.width, record.height)
        if box is None:
            continue
        detection: dict[str, Any] = {
            "category": str(detection_ids.id_of(d.label)),
            "conf": round(d.score, DECIMALS),
            "bbox": [round(v, DECIMALS) for v in box],
        }
        species = models.species(d)
        if species is not None:
            # The answer first (with a taxonomy, at the rank it reached), then the top-k
            ranked = sorted(species.topk, key=lambda pair: pair[1], reverse=True)
            if species.label not in (label for label, _ in ranked[:1]):
                ranked = [(species.label, species.score), *ranked]
            detection["classifications"] = [
                [str(classification_ids.id_of(models.scientific_name(label))),
                 round(score, DECIMALS)]
                for label, score in ranked
            ]
        detections.append(detection)
    image["detections"] = detections
    return image


def _table(ids: LabelIds) -> dict[str, str]:
    return {str(i): label for i, label in ids.items()}
