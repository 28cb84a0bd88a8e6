"""A TCP relay to a real server that can be taken down and brought back, for tests of an
endpoint that is down: while down, its port refuses connections, as a stopped server's does."""

from __future__ import annotations

import socket
import threading
from contextlib import suppress
from urllib.parse import urlsplit

from tests.support.servers import accepted, free_port

RELAY_PIECE = 256 * 1024


class SwitchableRelay:
    """A TCP relay on 127.0.0.1 to a real server, that can be taken down (its port then
    refuses connections: nothing listens there, as for a server that is down) and brought
    back up on the same port. Taking it down also cuts the connections it relays."""

    def __init__(self, upstream: str) -> None:
        self._upstream = ("127.0.0.1", urlsplit(upstream).port or 80)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._acceptor: threading.Thread | None = None

    def up(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.2)
        self._listener, self._stop = listener, threading.Event()
        self._acceptor = threading.Thread(target=self._accept, args=(listener, self._stop))
        self._acceptor.start()

    def down(self) -> None:
        self._stop.set()
        if self._acceptor is not None:
            self._acceptor.join(10)
        if self._listener is not None:
            self._listener.close()
        self._acceptor = self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket, stop: threading.Event) -> None:
        for client in accepted(listener, stop):
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, target), daemon=True).start()

    def __enter__(self) -> SwitchableRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def _pump(source: socket.socket, target: socket.socket) -> None:
    """Bytes from `source` to `target` until either end closes (bounded by socket timeouts:
    a relayed connection idle for 60 s is dropped)."""
    source.settimeout(60)
    with suppress(OSError):
        while piece := source.recv(RELAY_PIECE):
            target.sendall(piece)
        target.shutdown(socket.SHUT_WR)
