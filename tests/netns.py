"""A worker host of the tests' own: a Linux network namespace joined to this one by a veth pair.

The namespace has loopback and one link, to HOST_ADDR on this side; the services it may use
(PostgreSQL, a private redis-server, the image server, all on this machine's loopback) are
forwarded to HOST_ADDR by TcpForwarder, so those addresses and loopback are the only targets
there are. `partition()` takes this side of the link down: the worker's packets are dropped
in silence, as behind a cut cable, and its connections hang instead of failing; `heal()`
brings it back and they resume. HOST_ADDR stays a local address of this machine while the
link is down, so workers here reach the forwarded services all along.

Needs root and a kernel that allows network namespaces (`ip netns add`); `unavailable()`
says why not, for a skip.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import uuid
from types import TracebackType

SUBNET = "10.251.{n}.{host}/30"


def _ip(*args: str, netns: str | None = None) -> None:
    argv = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise OSError(f"{' '.join(argv)}: {done.stderr.strip()}")


def unavailable() -> str | None:
    """Why a namespace cannot be made here (not root, no `ip`, not permitted), or None."""
    name = f"trapq-probe-{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", name)
    except (OSError, subprocess.SubprocessError) as e:
        return f"network namespaces are not permitted here ({e})"
    _ip("netns", "del", name)
    return None


class NetNs:
    """A namespace, its veth pair and its addresses; everything is removed on exit."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name = f"trapq-{tag}"
        self.host_if, self.ns_if = f"tqh{tag}", f"tqw{tag}"
        n = int(tag, 16) % 250 + 1
        self.host_addr = SUBNET.format(n=n, host=1).split("/")[0]
        self._host_cidr, self._ns_cidr = SUBNET.format(n=n, host=1), SUBNET.format(n=n, host=2)

    def __enter__(self) -> NetNs:
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            _ip("link", "set", self.ns_if, "netns", self.name)
            _ip("addr", "add", self._host_cidr, "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            _ip("addr", "add", self._ns_cidr, "dev", self.ns_if, netns=self.name)
            _ip("link", "set", self.ns_if, "up", netns=self.name)
            _ip("link", "set", "lo", "up", netns=self.name)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for args in (("link", "del", self.host_if), ("netns", "del", self.name)):
            try:
                _ip(*args)
            except OSError:
                pass  # not made, or already gone with its peer

    def argv(self, argv: list[str]) -> list[str]:
        """`argv` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def partition(self) -> None:
        _ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_if, "up")


class TcpForwarder:
    """Accepts on (listen_host, a free port) and relays each connection to `target`."""

    def __init__(self, listen_host: str, target: tuple[str, int]) -> None:
        self.target = target
        self._server = socket.create_server((listen_host, 0))
        self.port = int(self._server.getsockname()[1])
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> TcpForwarder:
        threading.Thread(target=self._accept, name="trapq-forward", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._closed = True
            sockets = [self._server, *self._sockets]
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
