"""Real servers on 127.0.0.1 for tests: moto_server (S3), `rclone serve s3` (S3 that checks
SigV4 signatures, which moto does not) and gcp-storage-emulator (GCS).

Each is started as a subprocess on a free port, polled until it answers, and stopped by its PID
(terminate, then kill) whatever happens to the tests that used it.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

BIN = Path(sys.executable).parent


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# Below the ephemeral range: a port the kernel hands to a port-0 bind is also one it may give
# any outgoing connection as its source port in the second or two before a server started on
# it binds. Chosen by the system's randomness, so that xdist workers do not follow one sequence.
_PORTS = range(20000, max(20001, _ephemeral_low()))
_CHOOSE = random.SystemRandom()


def free_port() -> int:
    """A port nothing listens on now, for a server about to be started on it."""
    for _ in range(200):
        port = _CHOOSE.choice(_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


def accepted(listener: socket.socket, stop: threading.Event) -> Iterator[socket.socket]:
    """Each connection an in-process test server's listener accepts, until `stop` is set (the
    listener has a timeout, so that a stop is seen within it)."""
    while not stop.is_set():
        try:
            client, _ = listener.accept()
        except TimeoutError:
            continue
        yield client


class ScriptedHttpServer:
    """An in-process HTTP server on 127.0.0.1 that answers each connection's one request with
    `answer(request head)`: for answers no real server gives. Stop it with `close()`."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def answer(self, request: str) -> bytes:
        raise NotImplementedError

    def _serve(self) -> None:
        for client in accepted(self._listener, self._stop):
            with client, suppress(OSError):
                client.settimeout(5)
                head = b""
                while b"\r\n\r\n" not in head:
                    piece = client.recv(4096)
                    if not piece:
                        break
                    head += piece
                client.sendall(self.answer(head.decode("latin-1")))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._listener.close()


def _wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answered, even if with an error status
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server at {url} not ready after {timeout}s")


def _wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Until something listens on the port (an HTTPS server's certificate is the test's own,
    which urllib would refuse)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on port {port} not ready after {timeout}s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _command(name: str) -> str:
    candidate = BIN / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed: run scripts/setup.sh --test")
    return found


@contextmanager
def moto_server(log_dir: Path) -> Iterator[str]:
    """An S3 endpoint URL served by moto_server."""
    port = free_port()
    log = open(log_dir / "moto_server.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [_command("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/moto-api/", process)
        yield url
    finally:
        _stop(process)
        log.close()


@contextmanager
def rclone_s3(
    log: Path,
    root: Path,
    access_key: str,
    secret_key: str,
    tls: tuple[Path, Path] | None = None,
) -> Iterator[str]:
    """An S3 endpoint URL served by `rclone serve s3` from the directory `root` (each
    top-level directory a bucket). It accepts only requests signed with the given key pair.
    `tls`: (certificate, key) PEM files, to serve HTTPS. Every request it answers is logged
    to `log` (`GET OBJECT Bucket: b Object: k`)."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    command = [
        _command("rclone"),
        "serve",
        "s3",
        "--auth-key",
        f"{access_key},{secret_key}",
        "--addr",
        f"127.0.0.1:{port}",
        "--config",
        "/dev/null",  # no rclone.conf of the user's
        "-vv",
    ]
    if tls is not None:
        command += ["--cert", str(tls[0]), "--key", str(tls[1])]
    log_file = open(log, "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen([*command, str(root)], stdout=log_file, stderr=subprocess.STDOUT)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        _wait_port(port, process)
        yield url
    finally:
        _stop(process)
        log_file.close()


@contextmanager
def gcs_emulator(log_dir: Path) -> Iterator[str]:
    """A GCS emulator host URL (for STORAGE_EMULATOR_HOST), in memory."""
    port = free_port()
    log = open(log_dir / "gcs_emulator.log", "wb")  # noqa: SIM115 - closed below
    env = dict(os.environ)
    process = subprocess.Popen(
        [
            _command("gcp-storage-emulator"),
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--in-memory",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/storage/v1/b", process)
        yield url
    finally:
        _stop(process)
        log.close()
