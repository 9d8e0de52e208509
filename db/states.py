"""State names stored in the job store, as plain strings so bulk SQL can write them too."""

from enum import StrEnum


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ChunkState(StrEnum):
    PENDING = "pending"  # created, message not (yet) sent
    QUEUED = "queued"  # message on the broker
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ItemState(StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class AntennaTaskState(StrEnum):
    WAITING = "waiting"  # its capture's work item has not ended
    READY = "ready"  # answer stored, to be posted
    POSTING = "posting"  # claimed by one bridge, POST in flight
    ANSWERED = "answered"  # Antenna accepted the answer


CHUNK_ENDED = (ChunkState.DONE, ChunkState.FAILED, ChunkState.CANCELLED)
JOB_ENDED = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)
