"""The one settings object, read from TRAPQ_* environment variables and an optional .env.

Defaults are embedded (SQLite job store, Kombu's SQLAlchemy transport on SQLite as broker) so
that the demo needs no server; production points the URLs at PostgreSQL and Redis. Sizes are in
MiB (the _mb settings). tasks.worker.boot.engine_config is where they reach the engine.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ALLOWED_DB_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg")
ALLOWED_BROKER_SCHEMES = ("redis", "rediss", "sqla+sqlite", "sqla+postgresql", "amqp", "pyamqp")
# A worker under load misses shorter deadlines and redelivers chunks that are merely slow;
# tests lower the floor (TRAPQ_TEST_TIMEOUTS) so a fault costs them seconds, not tens of them.
TIMEOUT_FLOOR_S = 10
TIMEOUTS_WITH_A_FLOOR = (
    "chunk_soft_time_limit_s", "chunk_time_limit_s", "visibility_timeout_s", "redelivery_sweep_s"
)


class Settings(BaseSettings):
    # hide_input_in_errors: a rejected URL may carry a password; errors name the setting only.
    model_config = SettingsConfigDict(
        env_prefix="TRAPQ_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    data_dir: Path = Field(Path(".trapq"), description="Where the embedded defaults keep files.")
    database_url: str = Field("", description="Job store URL; default: SQLite in data_dir.")
    broker_url: str = Field(
        "", description="Celery broker; default: SQLAlchemy transport on SQLite."
    )
    result_backend: str = Field(
        "", description="Celery result backend; default: SQLite in data_dir."
    )

    # Queueing
    queue: str = Field("gpu", description="Celery queue the chunk tasks go to.")
    chunk_size: int = Field(64, ge=1, le=100_000, description="Captures per chunk (one message).")
    chunk_soft_time_limit_s: int = Field(
        1800, ge=1, description="Soft deadline of one chunk (at least 10 s)."
    )
    chunk_time_limit_s: int = Field(
        2100, ge=1, description="Hard deadline of one chunk (at least 10 s)."
    )
    visibility_timeout_s: int = Field(
        7200, ge=1, description="Redis redelivery of unacked chunks; above the hard limit."
    )
    redelivery_sweep_s: int = Field(
        10, ge=1, description="Seconds between a worker's sweeps for unacked chunks past the "
        "visibility timeout (at least 10 s)."
    )
    test_timeouts: bool = Field(
        False, description="Tests only: lets the four settings above go below their 10 s floor."
    )
    max_retries: int = Field(5, ge=0, description="Retries of a chunk for transient errors.")
    retry_backoff_s: int = Field(5, ge=1, description="First retry countdown; doubles each time.")
    retry_backoff_max_s: int = Field(300, ge=1, description="Longest retry countdown.")
    retry_jitter: bool = Field(
        True, description="Full jitter: each countdown drawn between 0 and its backoff."
    )
    max_deliveries: int = Field(
        5, ge=1, description="Starts of one chunk (since requeue) before it is failed for good."
    )

    # Dispatcher (tasks.dispatcher): a shallow window on the broker, the rest pending in SQL
    dispatch_window_min: int = Field(
        4, ge=1, description="Fewest chunk messages the dispatcher keeps out (2 x live slots)."
    )
    dispatch_poll_s: float = Field(
        2.0, gt=0, description="Longest wait between dispatch rounds without a wake-up."
    )
    dispatch_in_doubt_s: float = Field(
        30.0, gt=0, description="Age at which a chunk recorded but never confirmed sent is resent."
    )
    interactive_share: float = Field(
        0.25, gt=0, le=1, description="Most of the live slots the fast lane (classify) may hold."
    )

    # Worker
    concurrency: int = Field(2, ge=1, description="Chunk threads per worker process (per GPU).")
    pool: Literal["threads", "prefork", "solo"] = Field("threads", description="Celery pool.")
    max_memory_mb: int = Field(
        0, ge=0, description="Worker RSS in MiB past which it restarts between chunks (0: off)."
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    worker_crash_pause_s: float = Field(
        5.0, ge=0, description="`trapq worker`: pause before starting a crashed worker again."
    )
    heartbeat_s: float = Field(
        5.0, gt=0, description="Seconds between a running chunk's heartbeats and progress reports."
    )
    write_batch_size: int = Field(
        128, ge=1, description="Captures whose results are written in one transaction."
    )

    # Models
    detector: str = Field("demo_detector", description="Registry name of the detector.")
    detector_weights: str = Field("", description="Path or URL; default: the registry's.")
    detector_labels: str = Field("", description="Label file (text or JSON).")
    detector_sha256: str = Field("", description="Expected sha256 of the detector weights.")
    box_threshold: float = Field(0.5, ge=0.0, le=1.0, description="Detector score threshold.")
    random_weights: bool = Field(
        False, description="Build the models with seeded random weights (tests, benchmarks)."
    )
    classifier: str = Field("demo_classifier", description="Registry name of the classifier.")
    classifier_weights: str = Field("", description="Path or URL; default: the registry's.")
    classifier_labels: str = Field("", description="Label file (text or JSON).")
    classifier_sha256: str = Field("", description="Expected sha256 of the classifier weights.")
    classifier_input_size: int = Field(
        0, ge=0, description="Crop side in pixels the classifier was trained at; 0: the registry's."
    )
    classifier_taxonomy: str = Field(
        "", description="Taxonomy CSV of the classifier's labels (rank, parents, GBIF key): "
        "answers below the species threshold roll up it.",
    )
    species_threshold: float = Field(
        0.6, gt=0.0, le=1.0, description="Below it a species answer rolls up the taxonomy to "
        "the lowest rank reaching it; a project's own (`trapq projects`) wins.",
    )
    store_probabilities: bool = Field(
        True, description="Store each classification's full softmax (float16, heads of up to "
        "4,096 labels) so another taxa list or threshold can be re-applied without the GPU.",
    )
    filter_classifier: str = Field(
        "", description="Optional first classifier (e.g. moth/non-moth)."
    )
    filter_weights: str = Field("", description="Weights of the filter classifier.")
    filter_labels: str = Field("", description="Labels of the filter classifier.")
    filter_sha256: str = Field("", description="Expected sha256 of the filter weights.")
    filter_input_size: int = Field(
        0, ge=0, description="Crop side of the filter classifier; 0: the registry's."
    )
    filter_negative: str = Field(
        "nonmoth", description="Filter label whose crops skip the second classifier."
    )
    top_k: int = Field(5, ge=1, le=100, description="Classifier top-k stored per detection.")
    weights_cache_dir: Path = Field(
        Path.home() / ".cache" / "trapq" / "weights",
        description="Downloaded weights, kept by their sha256.",
    )
    model_cache_mb: float = Field(
        4096, ge=0, description="Parameters and buffers of the pipelines a worker holds (0: no "
        "bound); least recently used out first."
    )
    affinity: bool = Field(
        True, description="Send a chunk to a worker that holds its pipeline (Redis broker)."
    )

    # Engine
    batch_size: int = Field(8, ge=1, description="Most images in one detector forward.")
    batch_wait_ms: int = Field(20, ge=0, description="Longest wait to fill a detector batch.")
    crop_batch_size: int = Field(256, ge=1, description="Most crops in one classifier forward.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Autocast dtype: auto is bf16 on CUDA, fp32 on CPU."
    )
    compile: bool = Field(False, description="torch.compile the models.")
    compile_backend: str = Field(
        "inductor", description="torch.compile backend (inductor needs a C compiler)."
    )
    gpu_decode: bool = Field(True, description="Decode JPEGs with nvJPEG on CUDA.")
    fetch_threads: int = Field(8, ge=1, description="Concurrent fetches per worker process.")
    decode_threads: int = Field(2, ge=1, description="CPU decode threads per worker process.")
    max_images_in_flight: int = Field(
        16, ge=1, description="Decoded images held per worker process (backpressure bound)."
    )
    max_bytes_in_flight_mb: int = Field(
        512, ge=16, description="Decoded MiB held per worker process (backpressure bound)."
    )
    max_fetching: int = Field(
        0, ge=0, description="Captures being fetched per worker process (0: 2x fetch threads)."
    )

    # Tracking (occurrences); defaults tuned on synthetic nights (python -m bench.tracking --tune)
    store_embeddings: bool = Field(
        True, description="Store each detection's classifier features (float16) for tracking."
    )
    track_after_job: bool = Field(True, description="Track a job's nights when it ends.")
    night_gap_s: float = Field(
        7200.0, gt=0, description="Seconds without a capture that end one night's session."
    )
    track_w_embedding: float = Field(1.0, ge=0, description="Weight of 1 - cosine similarity.")
    track_w_iou: float = Field(1.0, ge=0, description="Weight of 1 - IoU.")
    track_w_area: float = Field(1.0, ge=0, description="Weight of 1 - area ratio.")
    track_w_distance: float = Field(
        5.0, ge=0, description="Weight of centroid distance / image diagonal."
    )
    track_w_missed: float = Field(
        0.1, ge=0, description="Cost per capture a track went unseen."
    )
    track_max_cost: float = Field(2.0, gt=0, description="Links costing more are never made.")
    track_max_distance: float = Field(
        0.15, gt=0, description="Longest link, as centroid distance / image diagonal."
    )
    track_max_missed: int = Field(
        5, ge=0, description="Captures an insect may be missed and keep its identity."
    )
    track_max_gap_s: float = Field(
        1800.0, gt=0, description="Longest time an insect may go unseen and keep its identity."
    )
    track_embedding_momentum: float = Field(
        0.5, ge=0, lt=1, description="Weight of a track's old appearance in its running one."
    )

    # Bad input
    max_image_mb: float = Field(64, gt=0, description="Largest file fetched, in MiB.")
    max_image_pixels: int = Field(100_000_000, ge=1, description="Largest image decoded.")
    http_connect_timeout_s: float = Field(5.0, gt=0, description="HTTP connect timeout.")
    http_read_timeout_s: float = Field(30.0, gt=0, description="HTTP read timeout.")
    http_max_redirects: int = Field(5, ge=0, description="Redirects followed per fetch.")
    allowed_schemes: list[str] = Field(
        ["file", "http", "https", "s3"], description="URI schemes a capture may use."
    )
    allowed_roots: list[Path] = Field(
        [], description="If set, local captures must lie under one of these folders."
    )
    allowed_hosts: list[str] = Field(
        [], description="If set, HTTP captures must be on these hosts."
    )

    @field_validator("database_url")
    @classmethod
    def _check_db(cls, v: str) -> str:
        if v and v.split(":", 1)[0] not in ALLOWED_DB_SCHEMES:
            raise ValueError(f"TRAPQ_DATABASE_URL must start with one of {ALLOWED_DB_SCHEMES}")
        return v

    @field_validator("broker_url")
    @classmethod
    def _check_broker(cls, v: str) -> str:
        if v and v.split(":", 1)[0] not in ALLOWED_BROKER_SCHEMES:
            raise ValueError(f"TRAPQ_BROKER_URL must start with one of {ALLOWED_BROKER_SCHEMES}")
        return v

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        data = self.data_dir.resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{data / 'trapq.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{data / 'broker.db'}"
        if not self.result_backend:
            self.result_backend = f"db+sqlite:///{data / 'results.db'}"
        short = [f"TRAPQ_{name.upper()}" for name in TIMEOUTS_WITH_A_FLOOR
                 if getattr(self, name) < TIMEOUT_FLOOR_S]
        if short and not self.test_timeouts:
            raise ValueError(
                f"{short[0]} must be at least {TIMEOUT_FLOOR_S} s: shorter deadlines and "
                "redeliveries hit chunks that are merely slow (TRAPQ_TEST_TIMEOUTS is for tests)"
            )
        if self.visibility_timeout_s <= self.chunk_time_limit_s:
            raise ValueError(
                "TRAPQ_VISIBILITY_TIMEOUT_S must exceed TRAPQ_CHUNK_TIME_LIMIT_S, "
                "or Redis redelivers chunks that are still running"
            )
        return self

    @property
    def embedded(self) -> bool:
        """True when the broker is the SQLite transport, i.e. a single-machine setup."""
        return self.broker_url.startswith("sqla+sqlite")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
