"""Weight files by their bytes: a local file read where it lies, or a download (HTTP(S), S3) kept
in a content-addressed folder under its sha256, so any machine finds a pipeline's weights from
the location `trapq pipelines add` recorded and never trusts bytes it has not hashed.

A download goes to a temporary file in the cache folder, hashed as it streams, and is renamed
into place only when its hash is the one expected: a 404, a truncated body or a changed object
never leaves a file that a later load would take.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import requests

from inference.pipeline_spec import sha256_of
from inference.weights import WeightsError

BLOCK = 1 << 20


def is_local(location: str) -> bool:
    return urlsplit(location).scheme.lower() not in ("http", "https", "s3")


def without_query(location: str) -> str:
    """A URL without its query string and fragment (where presigned URLs keep their secret)."""
    return urlsplit(location)._replace(query="", fragment="").geturl()


def local_path(location: str) -> Path:
    """A path or file:// URI as a path (nothing is checked)."""
    if urlsplit(location).scheme.lower() == "file":
        location = location[len("file://") :]
    return Path(location).expanduser()


def cached_path(cache_dir: Path, sha256: str) -> Path:
    return Path(cache_dir) / "sha256" / sha256[:2] / sha256


def fetch(
    location: str, sha256: str | None, cache_dir: Path | None, timeout_s: float = 60.0
) -> Path:
    """A local file holding the weights at `location`.

    A local file is returned where it lies (the loader hashes it as it reads it). A URL or
    s3:// object is served from the cache when its sha256 is there, else downloaded; with
    `sha256` None (when a pipeline is first recorded) the download is kept under the hash it
    turns out to have. Raises WeightsError with the reason: not found, HTTP status, a missing
    S3 key, a truncated or changed download.
    """
    if is_local(location):
        path = local_path(location)
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}")
        return path
    if cache_dir is None:
        raise WeightsError(f"no cache folder (TRAPQ_WEIGHTS_CACHE_DIR) to download {location} into")
    if sha256:
        cached = cached_path(cache_dir, sha256)
        if cached.is_file():
            return cached
    return _download(location, sha256, Path(cache_dir), timeout_s)


def hash_location(
    location: str, cache_dir: Path | None, expected: str | None = None
) -> tuple[str, Path]:
    """The sha256 of the weights at `location` and the local file that holds them; with the
    `expected` hash, a download already in the cache is taken as it is (and any other refused)."""
    path = fetch(location, expected.strip().lower() if expected else None, cache_dir)
    if is_local(location):
        return sha256_of(path), path
    return path.name, path


def _download(location: str, expected: str | None, cache_dir: Path, timeout_s: float) -> Path:
    scratch = cache_dir / "sha256"
    scratch.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=scratch, prefix=".download-")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for block in _blocks(location, timeout_s):
                digest.update(block)
                out.write(block)
        found = digest.hexdigest()
        if expected and found != expected.strip().lower():
            raise WeightsError(
                f"download of {location} has sha256 {found}, the pipeline recorded {expected}: "
                "truncated, or the file was changed after `trapq pipelines add`"
            )
        target = cached_path(cache_dir, found)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
        return target
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _blocks(location: str, timeout_s: float) -> Iterator[bytes]:
    if urlsplit(location).scheme.lower() == "s3":
        yield from _s3_blocks(location, timeout_s)
        return
    try:
        with requests.get(location, stream=True, timeout=timeout_s) as r:
            if r.status_code >= 400:
                raise WeightsError(f"HTTP {r.status_code} downloading weights from {location}")
            yield from r.iter_content(BLOCK)
    except requests.exceptions.ChunkedEncodingError:
        raise WeightsError(
            f"the download of weights from {location} was cut short (truncated)"
        ) from None
    except requests.RequestException as e:
        reason = type(e).__name__
        raise WeightsError(f"cannot download weights from {location}: {reason}") from None


def _s3_blocks(location: str, timeout_s: float) -> Iterator[bytes]:
    from botocore.exceptions import BotoCoreError, ClientError

    from inference.s3 import s3_client, split_s3_uri

    bucket, key = split_s3_uri(location)
    client = s3_client(connect_timeout_s=timeout_s, read_timeout_s=timeout_s, pool_size=1)
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        yield from body.iter_chunks(BLOCK)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "error")
        raise WeightsError(f"cannot read weights from {location}: S3 {code}") from None
    except BotoCoreError as e:
        raise WeightsError(f"cannot read weights from {location}: {type(e).__name__}") from None
