"""A job runs its own pipeline on any worker: one started with other weights or another box
threshold loads the job's pipeline into its model cache and serves it; the same weights' bytes
at another path are the same pipeline (no load).

The job's spec is built by tasks.pipeline.pipeline_spec, the function `trapq enqueue` uses
(tests.worker_jobs.env_pipeline).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from sqlalchemy import Engine

from inference.registry import REGISTRY
from tests.fault_scenarios import wait_job_end
from tests.trapq_cli import trapq
from tests.worker_jobs import (
    BOXES_PER_IMAGE,
    chunk_rows,
    detections_per_capture,
    env_pipeline,
    item_states,
    make_job,
    send,
    worker_env,
    write_jpegs,
)

DEMO_CLASSIFIER = Path(REGISTRY["demo_classifier"].default_weights or "")


def _other_weights(path: Path) -> Path:
    """The demo classifier's architecture and shapes, one weight changed: other bytes."""
    state = torch.load(DEMO_CLASSIFIER, map_location="cpu", weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] + 0.01
    torch.save(state, path)
    return path


def _env(service_env: dict[str, str], **overrides: str) -> dict[str, str]:
    """A worker of the real demo classifier (not random weights) behind constant_boxes."""
    return worker_env(service_env, TRAPQ_RANDOM_WEIGHTS="false", **overrides)


@pytest.mark.parametrize(
    "worker_settings",
    [{"TRAPQ_CLASSIFIER_WEIGHTS": "other"}, {"TRAPQ_BOX_THRESHOLD": "0.3"}],
    ids=["other-weights", "other-threshold"],
)
def test_a_worker_started_with_other_settings_serves_the_jobs_own_pipeline(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory,
    worker_settings: dict[str, str],
) -> None:
    assert DEMO_CLASSIFIER.is_file(), "the demo checkpoints are committed"
    paths = write_jpegs(tmp_path / "images", 2)
    spec = env_pipeline(_env(service_env))
    job = make_job(clean_pg, [str(p) for p in paths], chunk_size=2, spec=spec)
    if worker_settings.get("TRAPQ_CLASSIFIER_WEIGHTS") == "other":
        worker_settings = {"TRAPQ_CLASSIFIER_WEIGHTS": str(_other_weights(tmp_path / "b.pt"))}
    env = _env(service_env, **worker_settings)
    worker = worker_factory(env).start()
    send(env, clean_pg, job.chunk_ids)

    assert wait_job_end(clean_pg, job.job_id, worker) == "done"
    (chunk,) = chunk_rows(clean_pg, job.job_id)
    assert chunk.error is None and chunk.attempts == 1
    assert item_states(clean_pg, job.job_id) == {"done": 2}
    assert set(detections_per_capture(clean_pg, job.job_id).values()) == {BOXES_PER_IMAGE}
    assert f"({spec.fingerprint()[:12]}) loaded into the model cache" in worker.log_text()


def test_the_same_weights_at_another_path_run_the_job(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory,
) -> None:
    """The fingerprint names the bytes, not where a machine keeps them."""
    assert DEMO_CLASSIFIER.is_file(), "the demo checkpoints are committed"
    paths = write_jpegs(tmp_path / "images", 2)
    job = make_job(clean_pg, [str(p) for p in paths], chunk_size=2,
                   spec=env_pipeline(_env(service_env)))
    copy = shutil.copy(DEMO_CLASSIFIER, tmp_path / "elsewhere.pt")
    env = _env(service_env, TRAPQ_CLASSIFIER_WEIGHTS=str(copy))
    worker = worker_factory(env).start()
    send(env, clean_pg, job.chunk_ids)

    assert wait_job_end(clean_pg, job.job_id, worker) == "done"
    assert set(detections_per_capture(clean_pg, job.job_id).values()) == {BOXES_PER_IMAGE}
    out = trapq(env, "enqueue", "test-deployment", "--only-unprocessed", "--dry-run")
    assert out.returncode != 0 and "no captures of 'test-deployment' match" in out.stderr
