"""The results writer takes the engine's boxes as they are: they must carry db's box record's
fields (db.boxes), since db and inference never import each other."""

from dataclasses import fields

from db.boxes import ClassificationRecord, DetectionRecord
from inference.types import Classification, Detection


def test_engine_boxes_carry_the_box_record_fields_the_writer_reads() -> None:
    for engine, record in ((Detection, DetectionRecord), (Classification, ClassificationRecord)):
        theirs = {f.name for f in fields(engine)}
        assert theirs <= {f.name for f in fields(record)}, engine
        assert theirs >= {f.name for f in fields(record)} - {"id", "occurrence_id"}, engine
