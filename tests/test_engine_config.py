"""Settings reach the engine by one explicit function (tasks.worker.boot.engine_config): every
engine field takes its setting's value, sizes turn from MiB into bytes, and none is left at
the engine's own default by a name that no longer matches."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from inference.engine import EngineConfig
from tasks.settings import Settings
from tasks.worker.boot import engine_config

NOT_FROM_SETTINGS = {"fetch.s3_options"}  # boto3 reads its own environment (AWS_*)


def _leaves(config: object, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out |= _leaves(value, f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def test_every_engine_field_comes_from_its_setting(tmp_path: Path) -> None:
    s = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path,
        max_image_mb=2.5,
        http_connect_timeout_s=1.5,
        http_read_timeout_s=7.0,
        http_max_redirects=1,
        allowed_schemes=["file"],
        allowed_roots=[tmp_path],
        allowed_hosts=["example.org"],
        fetch_threads=3,
        crop_batch_size=17,
        compile=True,
        compile_backend="eager",
        store_embeddings=True,
        batch_size=3,
        batch_wait_ms=7,
        gpu_decode=False,
        decode_threads=5,
        max_images_in_flight=9,
        max_bytes_in_flight_mb=100,
        max_image_pixels=1234,
        max_fetching=4,
    )
    config = _leaves(engine_config(s))
    default = _leaves(EngineConfig())

    assert config["fetch.max_image_bytes"] == int(2.5 * 2**20)
    assert config["max_bytes_in_flight"] == 100 * 2**20
    assert config["fetch.pool_size"] == 3 and config["forward.crop_batch_size"] == 17
    assert config["fetch.allowed_roots"] == (tmp_path,)
    unchanged = {k for k in config if config[k] == default[k]} - NOT_FROM_SETTINGS
    assert unchanged == set(), f"left at the engine's default: {sorted(unchanged)}"
