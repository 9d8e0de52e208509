"""Reading capture timestamps from manifests and the command line; stored times are UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def parse_timestamp(text: str) -> datetime:
    """ISO 8601 (a date alone is midnight) or EXIF's "YYYY:MM:DD HH:MM:SS"; naive means UTC.

    Raises ValueError with the offending text.
    """
    value = text.strip()
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        try:
            parsed = datetime.strptime(value, "%Y:%m:%d %H:%M:%S")
        except ValueError:
            raise ValueError(
                f"not a timestamp: {value!r} (use ISO 8601, e.g. 2024-06-01T22:15:00)"
            ) from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)
