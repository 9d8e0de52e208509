"""The shipped image and compose file give a GPU worker what its CUDA paths need."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _capabilities(value: str) -> set[str]:
    return {c.strip() for c in value.split(",")}


def test_image_and_compose_expose_the_hardware_jpeg_decoder() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    [env] = re.findall(r"NVIDIA_DRIVER_CAPABILITIES=([\w,]+)", dockerfile)
    assert {"compute", "utility", "video"} <= _capabilities(env)
    worker = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["worker"]
    assert {"compute", "utility", "video"} <= _capabilities(
        worker["environment"]["NVIDIA_DRIVER_CAPABILITIES"]
    )
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert {"gpu", "video"} <= set(device["capabilities"])


def test_image_has_a_c_compiler_for_torch_compile() -> None:
    runs = " ".join(re.findall(r"^RUN (.+?)(?<!\\)$", (ROOT / "Dockerfile").read_text(),
                               flags=re.M | re.S))
    assert re.search(r"apt-get install[^&]*\bgcc\b", runs.replace("\\\n", " "))
