"""Every way a fetch can fail becomes its own error kind with a message naming the capture."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from inference.fetch import Fetcher, FetchPolicy
from inference.types import ErrorKind, ItemFailure
from tests.inference_fixtures import HttpServer, http_server


@pytest.fixture(scope="module")
def server() -> Iterator[HttpServer]:
    with http_server() as s:
        s.files["ok.jpg"] = b"\xff\xd8 some bytes"
        s.files["big.jpg"] = b"z" * 5000
        yield s


def fetcher(**kwargs: object) -> Fetcher:
    defaults: dict[str, object] = {"http_read_timeout_s": 0.5, "max_image_bytes": 4096}
    return Fetcher(FetchPolicy(**{**defaults, **kwargs}))  # type: ignore[arg-type]


def failure(f: Fetcher, uri: str) -> ItemFailure:
    with pytest.raises(ItemFailure) as info:
        f.fetch(uri)
    return info.value


def test_local_path_and_file_uri_return_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(b"abc")
    assert fetcher().fetch(str(path)) == b"abc"
    assert fetcher().fetch(path.as_uri()) == b"abc"


def test_missing_file_and_directory_are_missing(tmp_path: Path) -> None:
    e = failure(fetcher(), str(tmp_path / "nope.jpg"))
    assert e.kind == ErrorKind.MISSING and "nope.jpg" in e.message
    assert failure(fetcher(), str(tmp_path)).kind == ErrorKind.MISSING


def test_file_over_the_byte_limit_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    path.write_bytes(b"x" * 5000)
    e = failure(fetcher(), str(path))
    assert e.kind == ErrorKind.TOO_LARGE and "5000 bytes" in e.message


def test_forbidden_scheme_and_root(tmp_path: Path) -> None:
    assert failure(fetcher(), "ftp://host/a.jpg").kind == ErrorKind.FORBIDDEN
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"x")
    inside = allowed / "in.jpg"
    inside.write_bytes(b"y")
    f = fetcher(allowed_roots=(allowed,))
    assert f.fetch(str(inside)) == b"y"
    e = failure(f, str(allowed / ".." / "outside.jpg"))
    assert e.kind == ErrorKind.FORBIDDEN and "outside the allowed roots" in e.message
    assert failure(fetcher(allowed_schemes=("file",)), "http://x/a.jpg").kind == ErrorKind.FORBIDDEN


def test_http_success_and_one_redirect(server: HttpServer) -> None:
    assert fetcher().fetch(f"{server.base}/file/ok.jpg") == server.files["ok.jpg"]
    assert fetcher().fetch(f"{server.base}/hop/ok.jpg") == server.files["ok.jpg"]


def test_http_404_is_a_status_error_and_5xx_is_transient(server: HttpServer) -> None:
    e = failure(fetcher(), f"{server.base}/status/404")
    assert e.kind == ErrorKind.HTTP_STATUS
    assert e.message.startswith("HTTP 404 from 127.0.0.1 for http://")
    e = failure(fetcher(), f"{server.base}/status/503")
    assert e.kind == ErrorKind.HTTP_SERVER and "HTTP 503" in e.message


def test_stalled_server_times_out(server: HttpServer) -> None:
    e = failure(fetcher(), f"{server.base}/stall")
    assert e.kind == ErrorKind.TIMEOUT and "/stall" in e.message


def test_redirect_loop_is_bounded(server: HttpServer) -> None:
    e = failure(fetcher(http_max_redirects=3), f"{server.base}/loop")
    assert e.kind == ErrorKind.NETWORK and "more than 3 redirects" in e.message
    assert server.hits["/loop"] >= 4


def test_http_body_over_the_limit_declared_or_streamed(server: HttpServer) -> None:
    assert failure(fetcher(), f"{server.base}/file/big.jpg").kind == ErrorKind.TOO_LARGE
    e = failure(fetcher(), f"{server.base}/chunked/16384")
    assert e.kind == ErrorKind.TOO_LARGE and "streamed" in e.message


def test_host_not_allowed(server: HttpServer) -> None:
    f = fetcher(allowed_hosts=("example.org",))
    e = failure(f, f"{server.base}/file/ok.jpg")
    assert e.kind == ErrorKind.FORBIDDEN and "127.0.0.1" in e.message


def test_connection_refused_is_a_network_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert failure(fetcher(), f"http://127.0.0.1:{port}/a.jpg").kind == ErrorKind.NETWORK
