"""S3 and S3-compatible stores (MinIO, Ceph, ...) through boto3, configured the usual way.

Endpoint and credentials come from the environment boto3 reads (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, AWS_PROFILE, ...),
so a MinIO server needs only AWS_ENDPOINT_URL besides its keys; with an endpoint of its own,
buckets are addressed by path (http://host:9000/bucket/key), which such servers all accept.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/key -> ("bucket", "some/key"); ValueError if it names no bucket."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3://bucket/key URI: {uri}")
    return parts.netloc, parts.path.lstrip("/")


def endpoint() -> str:
    """Where requests go, for messages: the configured endpoint or AWS's own."""
    for name in ENDPOINT_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    return "AWS S3"


def s3_client(
    *, connect_timeout_s: float, read_timeout_s: float, pool_size: int, **options: Any
) -> Any:
    """A client whose every request is bounded by the timeouts, with one retry at most (the
    chunk's own retry handles longer outages). `options` go to boto3's client (endpoint_url,
    region_name, ...) and override the environment."""
    custom_endpoint = "endpoint_url" in options or endpoint() != "AWS S3"
    config = Config(
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        max_pool_connections=pool_size,
        retries={"mode": "standard", "total_max_attempts": 2},
        s3={"addressing_style": "path" if custom_endpoint else "auto"},
    )
    return boto3.session.Session().client("s3", config=config, **options)
