"""Settings of the Antenna bridge (TRAPQ_ANTENNA_*), apart from the worker's: only `trapq
antenna` reads them, and the token never leaves this object unmasked except in the one
Authorization header the client builds."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.errors import UserError


class AntennaSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TRAPQ_ANTENNA_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    url: str = Field("", description="Antenna API base URL, e.g. https://antenna.example/api/v2.")
    token: SecretStr = Field(SecretStr(""), description="Antenna API token (or token_file).")
    token_file: Path | None = Field(None, description="File holding the Antenna API token.")
    projects: list[int] = Field([], description="Antenna project ids to serve.")
    pipelines: list[str] = Field(
        ["default"], description="trapq pipelines (NAME or NAME@VERSION) offered to Antenna."
    )
    service_name: str = Field("trapq", description="Processing service name shown in Antenna.")
    max_post_mb: float = Field(8.0, gt=0, description="Largest result POST body, in MiB.")
    ack_wait_s: float = Field(
        300.0, gt=0, description="Antenna's ack wait: an unanswered task is redelivered after it."
    )
    answer_within: float = Field(
        0.5, gt=0, le=1, description="Share of the ack wait the tasks held should be answered in."
    )
    first_batch: int = Field(
        64, ge=1, description="Tasks taken while the pool's rate is still unmeasured."
    )
    max_batch: int = Field(500, ge=1, description="Most tasks taken in one request.")
    chunk_size: int = Field(16, ge=1, description="Captures per chunk of a bridge job.")
    poll_s: float = Field(2.0, gt=0, description="Seconds between polls when there is no work.")
    timeout_s: float = Field(60.0, gt=0, description="HTTP timeout of one Antenna request.")
    backoff_max_s: float = Field(60.0, gt=0, description="Longest wait after Antenna failed.")

    def secret(self) -> str:
        """The token, from TRAPQ_ANTENNA_TOKEN or TRAPQ_ANTENNA_TOKEN_FILE."""
        token = self.token.get_secret_value().strip()
        if not token and self.token_file is not None:
            try:
                token = self.token_file.read_text().strip()
            except OSError as e:
                raise UserError(
                    f"cannot read TRAPQ_ANTENNA_TOKEN_FILE {self.token_file}: {e.strerror}"
                ) from None
        if not token:
            raise UserError(
                "no Antenna token: set TRAPQ_ANTENNA_TOKEN or TRAPQ_ANTENNA_TOKEN_FILE "
                "(a token of an Antenna user who may run the project's jobs)"
            )
        return token

    @property
    def max_post_bytes(self) -> int:
        return int(self.max_post_mb * 2**20)


class ServeSettings(BaseSettings):
    """`trapq serve`, Antenna's push API (TRAPQ_SERVE_*)."""

    model_config = SettingsConfigDict(
        env_prefix="TRAPQ_SERVE_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    name: str = Field("trapq", description="Service name /info reports.")
    pipelines: list[str] = Field(
        ["default"], description="trapq pipelines (NAME or NAME@VERSION) /process runs."
    )
    token: SecretStr = Field(SecretStr(""), description="Bearer token required, if set.")
    max_images: int = Field(16, ge=1, description="Most source images in one request.")
    max_request_kb: int = Field(256, ge=1, description="Largest request body, in KiB.")
    timeout_s: float = Field(120.0, gt=0, description="Longest wait for one request's images.")

    @property
    def max_request_bytes(self) -> int:
        return self.max_request_kb * 1024
