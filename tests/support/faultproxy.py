"""A fault-injecting HTTP proxy for tests, between a client (the mount) and a real server.

It listens on 127.0.0.1 only and forwards each request to one upstream (moto_server, the GCS
emulator), one request per connection (`Connection: close` both ways), so that a fault hits
exactly one request. Rules pick the faulty requests: the first rule whose `match` is a substring
of `METHOD target RANGE` (and that has uses left) decides what happens to that request:

    pass          forward untouched
    status        answer an HTTP error without asking upstream (500, 503, S3 SlowDown, 403...)
    reset         read the request, then reset the connection (RST) before any answer
    reset_mid     forward the headers and part of the body, then reset the connection
    cut           forward the headers and part of the body, then close cleanly (body cut short)
    stall         read the request, answer nothing for `seconds`, then close
    trickle       forward the answer `piece` bytes every `interval` seconds
    flip          forward the answer with one body byte inverted (headers untouched)
    replace       forward the answer with every body byte inverted (a stale ETag's other bytes)

With `hide_md5_etags` set, every S3 ETag that is an MD5 reaches the client as another 32-hex
value (in HEAD and GET headers and in listings; If-Match is mapped back), as AWS gives objects
encrypted with SSE-KMS: an ETag that looks like an MD5 and is none of their bytes.

Every loop is bounded in count and in time, and `stop()` ends stalls and trickles at once:
a test that forgets a proxy cannot hang. Use it as a context manager.
"""

from __future__ import annotations

import hashlib
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MAX_CONNECTIONS = 100_000  # accepted over a proxy's life, then it stops accepting
MAX_CONCURRENT = 128
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 512 * 1024 * 1024
IO_TIMEOUT = 60.0  # any single socket wait
REQUEST_DEADLINE = 300.0  # one request, end to end, whatever the fault
RECV_SIZE = 256 * 1024

FAULTS = ("pass", "status", "reset", "reset_mid", "cut", "stall", "trickle", "flip", "replace")

S3_ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("ServiceUnavailable", "Please reduce your request rate."),
    403: ("AccessDenied", "Access Denied"),
}


@dataclass
class Rule:
    fault: str
    # Substring(s) of "METHOD target RANGE", all of which must be present; "" matches all.
    match: str | tuple[str, ...] = ""
    times: int | None = None  # uses left; None: every matching request
    status: int = 503
    code: str | None = None  # S3 error code (SlowDown, InternalError...), JSON for GCS
    body: bytes | None = None  # raw error body, instead of the generated one
    fraction: float = 0.5  # reset_mid / cut: share of the body sent before the fault
    seconds: float = 120.0  # stall
    piece: int = 64 * 1024  # trickle
    interval: float = 0.05  # trickle
    flip_at: int = 0  # flip: body offset (clamped to the body)
    used: int = 0

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}")

    def matches(self, text: str) -> bool:
        parts = (self.match,) if isinstance(self.match, str) else self.match
        return all(part in text for part in parts)


@dataclass
class Seen:
    text: str  # METHOD target RANGE
    fault: str
    started: float
    ended: float = 0.0


@dataclass
class _Request:
    method: str
    target: str
    range: str  # the Range header, "" without one
    head: bytes  # request line and headers, rewritten for upstream
    body: bytes

    @property
    def text(self) -> str:
        """What rules match against: `GET /bucket/key?query bytes=0-1048575`."""
        return f"{self.method} {self.target} {self.range}".rstrip()


@dataclass
class FaultProxy:
    upstream: str  # http://127.0.0.1:PORT
    gcs: bool = False  # error bodies in GCS's JSON instead of S3's XML
    rules: list[Rule] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    hide_md5_etags: bool = False
    _real_etags: dict[bytes, bytes] = field(default_factory=dict)  # shown -> real

    def __post_init__(self) -> None:
        parts = urlsplit(self.upstream)
        if parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError("the fault proxy only forwards to 127.0.0.1")
        self._upstream = ("127.0.0.1", parts.port or 80)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT)
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(256)
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)

    # -- control ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(
        self,
        fault: str,
        match: str | tuple[str, ...] = "",
        times: int | None = None,
        **options: object,
    ) -> Rule:
        rule = Rule(fault, match, times, **options)  # type: ignore[arg-type]
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def faults_applied(self, fault: str | None = None, match: str | tuple[str, ...] = "") -> int:
        probe = Rule("pass", match)
        with self._lock:
            return sum(
                1
                for s in self.seen
                if s.fault != "pass"
                and (fault is None or s.fault == fault)
                and probe.matches(s.text)
            )

    def requests(self, match: str | tuple[str, ...] = "") -> list[Seen]:
        probe = Rule("pass", match)
        with self._lock:
            return [s for s in self.seen if probe.matches(s.text)]

    def start(self) -> FaultProxy:
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._acceptor.join(10)
        self._listener.close()
        for thread in list(self._threads):
            thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- serving ----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        accepted = 0
        while not self._stop.is_set() and accepted < MAX_CONNECTIONS:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted += 1
            if not self._slots.acquire(timeout=IO_TIMEOUT):
                _reset(client)
                continue
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        deadline = time.monotonic() + REQUEST_DEADLINE
        seen: Seen | None = None
        try:
            client.settimeout(IO_TIMEOUT)
            request = _read_request(client, deadline)
            if request is None:
                return
            rule = self._pick(request)
            fault = rule.fault if rule else "pass"
            seen = Seen(request.text, fault, time.monotonic())
            with self._lock:
                if len(self.seen) < 100_000:
                    self.seen.append(seen)
            self._apply(client, request, rule, deadline)
        except OSError:
            pass  # the client went away: nothing to answer
        finally:
            if seen is not None:
                seen.ended = time.monotonic()
            try:
                client.close()
            finally:
                self._slots.release()

    def _pick(self, request: _Request) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(request.text) and (rule.times is None or rule.used < rule.times):
                    rule.used += 1
                    return rule
        return None

    def _apply(
        self, client: socket.socket, request: _Request, rule: Rule | None, deadline: float
    ) -> None:
        fault = rule.fault if rule else "pass"
        if rule is not None and fault == "status":
            client.sendall(self._error_response(rule))
            return
        if fault == "reset":
            _reset(client)
            return
        if rule is not None and fault == "stall":
            self._stop.wait(min(rule.seconds, max(0.0, deadline - time.monotonic())))
            return
        if self.hide_md5_etags:
            request = self._with_real_etags(request)
        response = _forward(self._upstream, request, deadline)
        if self.hide_md5_etags:
            response = self._with_shown_etags(response)
        head, body = _split_response(response)
        if rule is None or fault == "pass":
            client.sendall(response)
        elif fault in ("reset_mid", "cut"):
            keep = min(len(body) - 1, int(len(body) * rule.fraction)) if body else 0
            client.sendall(head + body[: max(keep, 0)])
            if fault == "reset_mid":
                _reset(client)
            else:
                client.shutdown(socket.SHUT_WR)
        elif fault == "trickle":
            self._trickle(client, head + body, rule, deadline)
        elif fault == "flip":
            data = bytearray(body)
            if data:
                data[min(rule.flip_at, len(data) - 1)] ^= 0xFF
            client.sendall(head + bytes(data))
        elif fault == "replace":
            client.sendall(head + bytes(b ^ 0xFF for b in body))

    def _shown(self, match: re.Match[bytes]) -> bytes:
        real = match.group(2)
        shown = hashlib.md5(b"kms:" + real).hexdigest().encode()
        with self._lock:
            self._real_etags[shown] = real
        return match.group(1) + shown

    def _with_shown_etags(self, response: bytes) -> bytes:
        head, body = _split_response(response)
        head = _ETAG_HEADER.sub(self._shown, head)
        if body.startswith(b"<?xml"):  # a listing; never an object's bytes in these tests
            body = _ETAG_ELEMENT.sub(self._shown, body)
        return head + body

    def _with_real_etags(self, request: _Request) -> _Request:
        def real(match: re.Match[bytes]) -> bytes:
            with self._lock:
                return match.group(1) + self._real_etags.get(match.group(2), match.group(2))

        request.head = _IF_MATCH_HEADER.sub(real, request.head)
        return request

    def _trickle(self, client: socket.socket, data: bytes, rule: Rule, deadline: float) -> None:
        piece = max(1, rule.piece)
        for start in range(0, len(data), piece):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            client.sendall(data[start : start + piece])
            if start + piece < len(data):
                self._stop.wait(rule.interval)

    def _error_response(self, rule: Rule) -> bytes:
        status = rule.status
        if rule.body is not None:
            body, kind = rule.body, "application/xml"
        elif self.gcs:
            message = rule.code or "injected fault"
            body = (
                f'{{"error": {{"code": {status}, "message": "{message}", '
                f'"errors": [{{"message": "{message}", "reason": "backendError"}}]}}}}'
            ).encode()
            kind = "application/json"
        else:
            default_code, message = S3_ERRORS.get(status, ("InternalError", "injected fault"))
            code = rule.code or default_code
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>{message}</Message>"
                "<RequestId>fault</RequestId></Error>"
            ).encode()
            kind = "application/xml"
        reason = {
            500: "Internal Server Error",
            503: "Service Unavailable",
            403: "Forbidden",
            429: "Too Many Requests",
        }
        return (
            f"HTTP/1.1 {status} {reason.get(status, 'Error')}\r\n"
            f"Content-Type: {kind}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body


# -- HTTP plumbing ----------------------------------------------------------------------------


def _reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN: the peer sees 'connection reset'."""
    with suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _recv_head(sock: socket.socket, deadline: float) -> tuple[bytes, bytes]:
    """(headers up to and including the blank line, bytes already read after them)."""
    data = b""
    for _ in range(MAX_HEADER_BYTES):  # at least one byte per round
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            return data[: end + 4], data[end + 4 :]
        if len(data) > MAX_HEADER_BYTES or time.monotonic() > deadline:
            break
        piece = sock.recv(RECV_SIZE)
        if not piece:
            break
        data += piece
    return b"", data


def _recv_exactly(sock: socket.socket, have: bytes, total: int, deadline: float) -> bytes:
    pieces = [have]
    got = len(have)
    for _ in range(total + 1):  # each round reads at least one byte
        if got >= total or time.monotonic() > deadline:
            break
        piece = sock.recv(min(RECV_SIZE, total - got))
        if not piece:
            break
        pieces.append(piece)
        got += len(piece)
    return b"".join(pieces)


def _recv_to_eof(sock: socket.socket, have: bytes, deadline: float) -> bytes:
    pieces = [have]
    got = len(have)
    for _ in range(MAX_BODY_BYTES + 1):  # each round reads at least one byte
        if got > MAX_BODY_BYTES or time.monotonic() > deadline:
            break
        piece = sock.recv(RECV_SIZE)
        if not piece:
            break
        pieces.append(piece)
        got += len(piece)
    return b"".join(pieces)


_ETAG_HEADER = re.compile(rb'(?im)(^etag:[ \t]*"?)([0-9a-f]{32})')
_ETAG_ELEMENT = re.compile(rb"(<ETag>(?:&quot;|&#34;|\")?)([0-9a-f]{32})")
_IF_MATCH_HEADER = re.compile(rb'(?im)(^if-(?:none-)?match:[ \t]*"?)([0-9a-f]{32})')


def _header(head: bytes, name: str) -> str | None:
    match = re.search(rb"(?im)^" + name.encode() + rb":[ \t]*(.*?)\r$", head)
    return match.group(1).decode("latin-1").strip() if match else None


def _with_connection_close(head: bytes) -> bytes:
    lines = head[:-4].split(b"\r\n")
    kept = [
        line
        for line in lines
        if not re.match(rb"(?i)(connection|keep-alive|proxy-connection|expect):", line)
    ]
    return b"\r\n".join([*kept, b"Connection: close"]) + b"\r\n\r\n"


def _read_request(client: socket.socket, deadline: float) -> _Request | None:
    head, rest = _recv_head(client, deadline)
    if not head:
        return None
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = request_line.split(" ")
    if len(parts) < 3:
        return None
    method, target = parts[0], parts[1]
    if (_header(head, "Expect") or "").lower() == "100-continue":
        client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    length = int(_header(head, "Content-Length") or 0)
    if length > MAX_BODY_BYTES:
        return None
    body = _recv_exactly(client, rest, length, deadline)
    range_header = _header(head, "Range") or ""
    return _Request(method, target, range_header, _with_connection_close(head), body)


def _forward(upstream: tuple[str, int], request: _Request, deadline: float) -> bytes:
    """The upstream's whole answer to one request (headers rewritten to close)."""
    with socket.create_connection(upstream, timeout=IO_TIMEOUT) as server:
        server.sendall(request.head + request.body)
        head, rest = _recv_head(server, deadline)
        if not head:
            return b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        status = int(head.split(b" ", 2)[1])
        length = _header(head, "Content-Length")
        if request.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif length is not None and "chunked" not in (_header(head, "Transfer-Encoding") or ""):
            body = _recv_exactly(server, rest, int(length), deadline)
        else:
            body = _recv_to_eof(server, rest, deadline)
    return _with_connection_close(head) + body


def _split_response(response: bytes) -> tuple[bytes, bytes]:
    end = response.find(b"\r\n\r\n")
    return (response[: end + 4], response[end + 4 :]) if end >= 0 else (response, b"")


@contextmanager
def fault_proxy(upstream: str, gcs: bool = False) -> Iterator[FaultProxy]:
    """A started proxy to `upstream`, stopped (stalls and trickles ended) on the way out."""
    proxy = FaultProxy(upstream, gcs=gcs)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
