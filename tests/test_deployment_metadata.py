"""`trapq deployments set`: a deployment's location, period and camera, from options or a CSV."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, text

from tests.trapq_cli import one_line_error, trapq


def deployment(engine: Engine, name: str) -> dict[str, object]:
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT * FROM deployments WHERE name = :name"), {"name": name}
        ).mappings().one()
    return dict(row)


def test_set_records_the_given_fields_and_keeps_the_others(
    service_env: dict[str, str], clean_pg: Engine
) -> None:
    first = trapq(
        service_env, "deployments", "set", "night-1", "--lat", "52.37", "--lon", "4.89",
        "--start", "2024-06-01T21:00:00+02:00", "--end", "2024-06-02T06:00:00+02:00",
        "--capture-method", "timeLapse", "--camera-model", "Canon-EOS 90D",
        "--location-name", "Dune garden",
    )
    second = trapq(service_env, "deployments", "set", "night-1", "--habitat", "dune scrub")

    assert first.returncode == 0 and "night-1: created" in first.stdout, first.stderr
    assert second.returncode == 0 and "night-1: updated" in second.stdout, second.stderr
    row = deployment(clean_pg, "night-1")
    assert (row["latitude"], row["longitude"]) == (52.37, 4.89)
    assert row["deployment_start"] == datetime(2024, 6, 1, 19, 0, tzinfo=UTC)
    assert row["deployment_end"] == datetime(2024, 6, 2, 4, 0, tzinfo=UTC)
    assert row["capture_method"] == "timeLapse"
    assert row["camera_model"] == "Canon-EOS 90D"
    assert row["location_name"] == "Dune garden"
    assert row["habitat"] == "dune scrub"


def test_a_camtrap_dp_deployments_csv_sets_many_and_ignores_other_columns(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine
) -> None:
    path = tmp_path / "deployments.csv"
    path.write_text(
        "deploymentID,latitude,longitude,deploymentStart,deploymentEnd,captureMethod,"
        "cameraModel,cameraDelay,featureType\n"
        "trap-a,51.5,5.6,2024-06-01T21:00:00Z,2024-06-02T05:00:00Z,activityDetection,"
        "Reconyx-HF2X,0,\n"
        "trap-b,-33.9,151.2,2024-07-01T20:00:00+10:00,2024-07-02T06:00:00+10:00,timeLapse,,,\n"
    )

    done = trapq(service_env, "deployments", "set", "--csv", str(path))

    assert done.returncode == 0, done.stderr
    a, b = deployment(clean_pg, "trap-a"), deployment(clean_pg, "trap-b")
    assert (a["latitude"], a["capture_method"], a["camera_model"]) == (
        51.5, "activityDetection", "Reconyx-HF2X"
    )
    assert (b["longitude"], b["capture_method"], b["camera_model"]) == (151.2, "timeLapse", None)
    assert b["deployment_start"] == datetime(2024, 7, 1, 10, 0, tzinfo=UTC)


def test_values_camtrap_dp_would_reject_are_one_line_errors_and_change_nothing(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine
) -> None:
    bad_method = trapq(service_env, "deployments", "set", "n", "--capture-method", "motion")
    bad_lat = trapq(service_env, "deployments", "set", "n", "--lat", "91", "--lon", "0")
    backwards = trapq(
        service_env, "deployments", "set", "n", "--start", "2024-06-02", "--end", "2024-06-01"
    )
    path = tmp_path / "d.csv"
    path.write_text("deploymentID,latitude\nok,1\nbad,north\n")
    bad_cell = trapq(service_env, "deployments", "set", "--csv", str(path))

    assert "activityDetection or timeLapse" in one_line_error(bad_method)
    assert "outside -90..90" in one_line_error(bad_lat)
    assert "--end is before --start" in one_line_error(backwards)
    assert f"{path}:3: latitude" in one_line_error(bad_cell)
    with clean_pg.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM deployments")) == 0
