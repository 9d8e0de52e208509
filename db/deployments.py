"""A deployment's metadata (Camtrap DP deployment terms): checked, then written by name.

Only the fields given are changed, so `trapq deployments set NAME --habitat ...` keeps the
coordinates set earlier. A deployment named for the first time here is created, so metadata
may come before its captures.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from db.imports import find_deployment, get_or_create_deployment
from db.models import Deployment

CAPTURE_METHODS = ("activityDetection", "timeLapse")


@dataclass(frozen=True)
class DeploymentMetadata:
    """None means "leave as it is"; names are the columns of `deployments`."""

    location_id: str | None = None
    location_name: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    coordinate_uncertainty_m: int | None = None
    deployment_start: datetime | None = None
    deployment_end: datetime | None = None
    capture_method: str | None = None
    camera_id: str | None = None
    camera_model: str | None = None
    camera_height_m: float | None = None
    setup_by: str | None = None
    habitat: str | None = None
    comments: str | None = None

    def given(self) -> dict[str, Any]:
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    def problems(self) -> list[str]:
        """What Camtrap DP would reject, in the words of the `trapq deployments set` options."""
        found = []
        if self.latitude is not None and not -90 <= self.latitude <= 90:
            found.append(f"--lat {self.latitude} is outside -90..90")
        if self.longitude is not None and not -180 <= self.longitude <= 180:
            found.append(f"--lon {self.longitude} is outside -180..180")
        if self.coordinate_uncertainty_m is not None and self.coordinate_uncertainty_m < 1:
            found.append("--coordinate-uncertainty must be at least 1 (metres)")
        if self.camera_height_m is not None and self.camera_height_m < 0:
            found.append("--camera-height must not be negative")
        if self.capture_method is not None and self.capture_method not in CAPTURE_METHODS:
            found.append(
                f"--capture-method {self.capture_method!r}: use {' or '.join(CAPTURE_METHODS)}"
            )
        start, end = self.deployment_start, self.deployment_end
        if start is not None and end is not None and end < start:
            found.append("--end is before --start")
        return found


def set_metadata(session: Session, name: str, metadata: DeploymentMetadata) -> bool:
    """Write the given fields of deployment NAME; returns True when it was created here."""
    created = find_deployment(session, name) is None
    deployment_id = get_or_create_deployment(session, name)
    values = metadata.given()
    if values:
        session.execute(update(Deployment).where(Deployment.id == deployment_id).values(**values))
    return created
