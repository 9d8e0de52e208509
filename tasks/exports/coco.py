"""COCO detection JSON (images, annotations with pixel [x, y, w, h], categories), for training.

Images stream straight out; annotations come from the same pass, so they are spooled to a
temporary file and copied after the images: one read of the job, memory flat. Only captures
that were processed (`done`) are images: a failed one says nothing about what it shows.

An annotation's category is the species classifier's label where it gave one, else the
detector's label; its `score` is the detector's confidence, so the file also loads as results.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from typing import Any, TextIO

from sqlalchemy.orm import Session

from db.export_rows import JobContext, capture_records
from db.states import ItemState
from tasks.exports.common import ExportOptions, JobModels, LabelIds, file_of, utc_z

DECIMALS = 2


def write_coco(session: Session, ctx: JobContext, options: ExportOptions, out: TextIO) -> str:
    models = JobModels.of(ctx.pipeline)
    categories = LabelIds(
        tuple(models.scientific_name(label) for label in models.classifier_labels)
        + models.detector_labels, first_id=1,
    )
    info = {
        "description": f"trapq job {ctx.job_id} ({models.pipeline or 'pipeline'}: "
        f"{models.names()}) on {ctx.deployment.name}",
        "date_created": utc_z(ctx.finished_at or ctx.created_at),
        "version": models.fingerprint,
    }
    out.write('{"info": ' + json.dumps(info) + ', "images": [')
    n_images = n_annotations = 0
    with tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
        for record in capture_records(session, ctx.job_id):
            if record.state != ItemState.DONE.value:
                continue
            image: dict[str, Any] = {
                "id": record.capture_id,
                "file_name": file_of(record.uri, options.root),
                "width": record.width,
                "height": record.height,
            }
            if record.captured_at is not None:
                image["date_captured"] = utc_z(record.captured_at)
            out.write((",\n" if n_images else "\n") + json.dumps(image))
            n_images += 1
            for d in record.detections:
                w, h = d.x2 - d.x1, d.y2 - d.y1
                species = models.species(d)
                annotation = {
                    "id": d.id,
                    "image_id": record.capture_id,
                    "category_id": categories.id_of(
                        models.scientific_name(species.label) if species else d.label
                    ),
                    "bbox": [round(v, DECIMALS) for v in (d.x1, d.y1, w, h)],
                    "area": round(w * h, DECIMALS),
                    "iscrowd": 0,
                    "score": d.score,
                }
                spool.write((",\n" if n_annotations else "\n") + json.dumps(annotation))
                n_annotations += 1
        out.write('\n], "annotations": [')
        spool.seek(0)
        shutil.copyfileobj(spool, out)
    table = [{"id": i, "name": label, "supercategory": _parent(models, label)}
             for i, label in categories.items()]
    out.write('\n], "categories": ' + json.dumps(table) + "}\n")
    return f"{n_images} images, {n_annotations} annotations"


def _parent(models: JobModels, name: str) -> str:
    """A category's supercategory: its parent taxon's scientific name with a taxonomy."""
    taxonomy = models.taxonomy
    found = [t for t in taxonomy.taxa if t.scientific_name == name] if taxonomy else []
    if found and taxonomy is not None and found[0].parent is not None:
        return taxonomy.by_name()[found[0].parent].scientific_name
    return "object"
