"""Bytes of one capture from a local path, file://, http(s):// or s3://.

Every problem of the item alone is raised as an ItemFailure whose kind says whether a retry can
help and whose message names the URI, so one bad capture never fails the chunk around it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit
from urllib.request import url2pathname

import requests
from requests.adapters import HTTPAdapter

from inference.types import ErrorKind, ItemFailure

_CHUNK = 1 << 20


@dataclass(frozen=True)
class FetchPolicy:
    """What a fetch may touch and how long it may take. Built from the TRAPQ_* bad-input
    settings by tasks.worker.boot.engine_config (which turns their MiB into bytes)."""

    max_image_bytes: int = 64 * 2**20
    http_connect_timeout_s: float = 5.0
    http_read_timeout_s: float = 30.0
    http_max_redirects: int = 5
    allowed_schemes: tuple[str, ...] = ("file", "http", "https", "s3")
    allowed_roots: tuple[Path, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    pool_size: int = 8
    s3_options: dict[str, Any] = field(default_factory=dict)  # boto3 client arguments


class Fetcher:
    """Fetches with one pooled HTTP session (and one S3 client) per calling thread.

    requests.Session is not documented as thread-safe, so each fetch thread keeps its own.
    """

    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy
        self._roots = tuple(Path(r).resolve() for r in policy.allowed_roots)
        self._local = threading.local()

    def fetch(self, uri: str) -> bytes:
        scheme = _scheme(uri)
        if scheme not in self.policy.allowed_schemes:
            allowed = ", ".join(self.policy.allowed_schemes)
            raise ItemFailure(
                ErrorKind.FORBIDDEN, f"scheme {scheme}:// is not allowed ({allowed}) for {uri}"
            )
        if scheme == "file":
            return self._fetch_file(uri)
        if scheme in ("http", "https"):
            return self._fetch_http(uri)
        if scheme == "s3":
            return self._fetch_s3(uri)
        raise ItemFailure(ErrorKind.FORBIDDEN, f"scheme {scheme}:// is not supported for {uri}")

    def _fetch_file(self, uri: str) -> bytes:
        path = Path(url2pathname(urlsplit(uri).path)) if uri.startswith("file:") else Path(uri)
        path = path.expanduser().resolve()
        if self._roots and not any(path.is_relative_to(root) for root in self._roots):
            raise ItemFailure(ErrorKind.FORBIDDEN, f"{path} is outside the allowed roots for {uri}")
        try:
            with path.open("rb") as f:
                size = _file_size(f)
                if size > self.policy.max_image_bytes:
                    raise _too_large(size, self.policy.max_image_bytes, uri)
                return f.read()
        except FileNotFoundError:
            raise ItemFailure(ErrorKind.MISSING, f"no such file: {path}") from None
        except IsADirectoryError:
            raise ItemFailure(ErrorKind.MISSING, f"is a directory, not a file: {path}") from None
        except PermissionError:
            raise ItemFailure(ErrorKind.FORBIDDEN, f"permission denied reading {path}") from None

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=self.policy.pool_size)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
        return session

    def _check_host(self, url: str, original: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or parts.scheme not in self.policy.allowed_schemes:
            raise ItemFailure(
                ErrorKind.FORBIDDEN, f"redirect to scheme {parts.scheme}:// refused for {original}"
            )
        hosts = self.policy.allowed_hosts
        if hosts and parts.hostname not in hosts:
            raise ItemFailure(
                ErrorKind.FORBIDDEN, f"host {parts.hostname} is not allowed for {original}"
            )

    def _check_hop(self, url: str, uri: str) -> None:
        """A redirect never leads from a public address to an internal one (loopback,
        private, link-local): `trapq serve` admits only public URLs when no hosts are
        allowed, and a public server must not be able to point a worker inside. With
        allowed hosts, _check_host already holds every hop to them."""
        if self.policy.allowed_hosts or _internal_address(urlsplit(uri).hostname or ""):
            return
        host = urlsplit(url).hostname or ""
        if address := _internal_address(host):
            raise ItemFailure(
                ErrorKind.FORBIDDEN,
                f"redirect from a public host to {host}, an internal address ({address}), "
                f"refused for {uri}",
            )

    def _fetch_http(self, uri: str) -> bytes:
        """Follows redirects by hand so that every hop is checked against the allowed hosts
        and never turns inward (_check_hop)."""
        timeout = (self.policy.http_connect_timeout_s, self.policy.http_read_timeout_s)
        url = uri
        for _ in range(self.policy.http_max_redirects + 1):
            self._check_host(url, uri)
            if url != uri:
                self._check_hop(url, uri)
            try:
                with self._session().get(
                    url, stream=True, allow_redirects=False, timeout=timeout
                ) as resp:
                    if resp.is_redirect:
                        url = urljoin(url, resp.headers["location"])
                        continue
                    _raise_for_status(resp, uri)
                    return self._read_body(resp, uri)
            except requests.Timeout as e:
                raise ItemFailure(
                    ErrorKind.TIMEOUT, f"timed out ({_reason(e)}) for {uri}"
                ) from None
            except requests.ConnectionError as e:
                if "timed out" in str(e).lower():
                    raise ItemFailure(ErrorKind.TIMEOUT, f"read timed out for {uri}") from None
                raise ItemFailure(
                    ErrorKind.NETWORK, f"connection failed ({_reason(e)}) for {uri}"
                ) from None
            except requests.RequestException as e:
                raise ItemFailure(
                    ErrorKind.NETWORK, f"HTTP request failed ({_reason(e)}) for {uri}"
                ) from None
        raise ItemFailure(
            ErrorKind.NETWORK,
            f"more than {self.policy.http_max_redirects} redirects (loop?) for {uri}",
        )

    def _read_body(self, resp: requests.Response, uri: str) -> bytes:
        limit = self.policy.max_image_bytes
        declared = resp.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit, uri)
        body = bytearray()
        for block in resp.iter_content(_CHUNK):
            body += block
            if len(body) > limit:
                raise ItemFailure(
                    ErrorKind.TOO_LARGE, f"more than {limit} bytes streamed for {uri}"
                )
        return bytes(body)

    def _s3(self, uri: str) -> Any:
        client = getattr(self._local, "s3", None)
        if client is None:
            try:
                from inference.s3 import s3_client
            except ImportError:
                raise ItemFailure(
                    ErrorKind.FORBIDDEN,
                    f"s3:// needs the optional extra: pip install 'trapq[s3]' (for {uri})",
                ) from None
            client = s3_client(
                connect_timeout_s=self.policy.http_connect_timeout_s,
                read_timeout_s=self.policy.http_read_timeout_s,
                pool_size=self.policy.pool_size,
                **self.policy.s3_options,
            )
            self._local.s3 = client
        return client

    def _fetch_s3(self, uri: str) -> bytes:
        """GET the object with the HTTP fetch's timeouts and byte limit (checked on the
        declared length, and again while streaming)."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectTimeoutError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        from inference.s3 import endpoint, split_s3_uri

        try:
            bucket, key = split_s3_uri(uri)
        except ValueError as e:
            raise ItemFailure(ErrorKind.MISSING, str(e)) from None
        limit = self.policy.max_image_bytes
        try:
            response = self._s3(uri).get_object(Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                declared = int(response.get("ContentLength") or 0)
                if declared > limit:
                    raise _too_large(declared, limit, uri)
                data = bytearray()
                for block in iter(lambda: body.read(_CHUNK), b""):
                    data += block
                    if len(data) > limit:
                        raise ItemFailure(
                            ErrorKind.TOO_LARGE, f"more than {limit} bytes streamed for {uri}"
                        )
                return bytes(data)
            finally:
                body.close()
        except ClientError as e:
            raise _s3_failure(e, uri) from None
        except NoCredentialsError:
            raise ItemFailure(
                ErrorKind.FORBIDDEN,
                f"no S3 credentials on this worker (set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY) for {uri}",
            ) from None
        except (ConnectTimeoutError, ReadTimeoutError):
            raise ItemFailure(ErrorKind.TIMEOUT, f"S3 request timed out for {uri}") from None
        except (BotoCoreError, OSError) as e:
            raise ItemFailure(
                ErrorKind.NETWORK, f"S3 at {endpoint()} failed ({_reason(e)}) for {uri}"
            ) from None


def _s3_failure(error: Any, uri: str) -> ItemFailure:
    """An S3 error response as the item's failure: missing, forbidden, or the server's fault."""
    code = str(error.response.get("Error", {}).get("Code", ""))
    status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if code in ("NoSuchKey", "NotFound") or (status == 404 and code != "NoSuchBucket"):
        return ItemFailure(ErrorKind.MISSING, f"no such object: {uri}")
    if code == "NoSuchBucket":
        return ItemFailure(ErrorKind.MISSING, f"no such bucket for {uri}")
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
        return ItemFailure(ErrorKind.FORBIDDEN, f"S3 access denied ({code}) to {uri}")
    if status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"):
        return ItemFailure(ErrorKind.HTTP_SERVER, f"S3 error {code or status} for {uri}")
    return ItemFailure(ErrorKind.HTTP_STATUS, f"S3 error {code or status} for {uri}")


def _internal_address(host: str) -> str | None:
    """The first address of `host` that is not global (loopback, private, link-local...),
    or None; a name that does not resolve is None, and fails at connect with its own error."""
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not address.is_global:
            return str(address)
    return None


def _scheme(uri: str) -> str:
    scheme = urlsplit(uri).scheme.lower()
    # A one-letter scheme is a Windows drive ("C:\\..."), i.e. a local path.
    return "file" if len(scheme) <= 1 else scheme


def _file_size(f: Any) -> int:
    return os.fstat(f.fileno()).st_size


def _too_large(size: int, limit: int, uri: str) -> ItemFailure:
    return ItemFailure(ErrorKind.TOO_LARGE, f"{size} bytes is over the limit of {limit} for {uri}")


def _raise_for_status(resp: requests.Response, uri: str) -> None:
    code = resp.status_code
    if code < 400:
        return
    host = urlsplit(resp.url).hostname
    message = f"HTTP {code} from {host} for {uri}"
    if code >= 500 or code == 429:
        raise ItemFailure(ErrorKind.HTTP_SERVER, message)
    raise ItemFailure(ErrorKind.HTTP_STATUS, message)


def _reason(e: Exception) -> str:
    return type(e).__name__
