"""The command line's S3: capture rows from a bucket prefix (`trapq import s3://...`) and
export files uploaded to one (`trapq export -o s3://...`), every S3 problem one line.

The listing is paged (1,000 keys a request, as S3 answers), filtered by image suffix and an
optional regular expression on the key, and streamed into the job store's bulk insert, so a
bucket of millions never sits in memory. No object is read: the size is recorded by the
worker that decodes it, and captured_at is the object's LastModified time (the upload's; a
manifest with a captured_at column gives true capture times). Uploads go through boto3's
transfer manager (multipart for big files, read from disk in parts).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
)

from db.imports import CaptureRow
from inference.s3 import endpoint, s3_client, split_s3_uri
from tasks.errors import UserError
from tasks.settings import Settings

PAGE_SIZE = 1000  # the most S3 returns per request


def s3_rows(
    settings: Settings, uri: str, pattern: str | None, image_suffixes: frozenset[str]
) -> Iterator[CaptureRow]:
    """One row per image object under the prefix whose key matches `pattern` (re.search)."""
    bucket, prefix = _split(uri)
    try:
        wanted = re.compile(pattern) if pattern else None
    except re.error as e:
        raise UserError(f"--pattern {pattern!r} is not a regular expression: {e}") from None
    pages = _client(settings).get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": PAGE_SIZE}
    )
    with s3_errors(uri, "list"):
        for page in pages:
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if PurePosixPath(key).suffix.lower() not in image_suffixes:
                    continue
                if wanted is not None and not wanted.search(key):
                    continue
                yield CaptureRow(uri=f"s3://{bucket}/{key}", captured_at=obj["LastModified"],
                                 width=None, height=None)


def upload(settings: Settings, local: Path, uri: str) -> list[str]:
    """Upload a file to the key URI names, or a folder's files under it; returns the URIs."""
    bucket, key = _split(uri)
    files = sorted(p for p in local.iterdir() if p.is_file()) if local.is_dir() else [local]
    client = _client(settings)
    written = []
    with s3_errors(uri, "write"):
        for path in files:
            target = f"{key.rstrip('/')}/{path.name}" if local.is_dir() else key
            try:
                client.upload_file(str(path), bucket, target)
            except S3UploadFailedError as e:  # boto3 wraps the ClientError it caught
                if isinstance(e.__context__, ClientError):
                    raise e.__context__ from None
                raise UserError(f"cannot write {uri}: {e}") from None
            written.append(f"s3://{bucket}/{target}")
    return written


@contextmanager
def s3_errors(uri: str, doing: str) -> Iterator[None]:
    """S3's errors as one line saying what to check."""
    try:
        yield
    except NoCredentialsError:
        raise UserError(
            f"no S3 credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE), and AWS_ENDPOINT_URL for MinIO or another S3-compatible store"
        ) from None
    except EndpointConnectionError:
        raise UserError(
            f"cannot reach S3 at {endpoint()} for {uri}: check AWS_ENDPOINT_URL"
        ) from None
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        bucket, _ = split_s3_uri(uri)
        if code == "NoSuchBucket":
            raise UserError(f"no bucket {bucket!r} at {endpoint()}; check the URI") from None
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise UserError(
                f"S3 refused to {doing} {uri} ({code}): check the credentials "
                "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and the bucket's policy"
            ) from None
        raise UserError(f"cannot {doing} {uri} at {endpoint()}: {code or e}") from None
    except BotoCoreError as e:
        raise UserError(f"cannot {doing} {uri} at {endpoint()}: {e}") from None


def _split(uri: str) -> tuple[str, str]:
    try:
        return split_s3_uri(uri)
    except ValueError as e:
        raise UserError(str(e)) from None


def _client(settings: Settings) -> Any:
    return s3_client(
        connect_timeout_s=settings.http_connect_timeout_s,
        read_timeout_s=settings.http_read_timeout_s,
        pool_size=4,
    )
