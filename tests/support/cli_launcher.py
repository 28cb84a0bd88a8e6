"""A warm interpreter that starts the tests' `artifactfs` commands.

Each command still runs as `python -m artifactfs ARGS` in a process of its own, with the
test's environment, working directory, umask and stdio, and exits as a fresh interpreter does
(non-daemon threads joined, atexit handlers run, stdio flushed, a traceback and exit 1 for an
uncaught exception). Only its start differs: it is forked from this launcher, which has
imported the third-party libraries already. Importing SQLAlchemy alone costs ~0.5 s of CPU,
and a run of the suite starts the command ~500 times on two cores.

artifactfs itself is imported in the command's process, after its environment is set, as a
fresh interpreter would. Preloaded are only libraries that read no environment variable at
import (google-auth and wcwidth do, so they are not) and start no thread.

Protocol, one command per connection on a Unix SEQPACKET socket: the client sends one JSON message
(args, env, cwd, umask) with its stdin, stdout and stderr as SCM_RIGHTS file descriptors; the
launcher forks a handler, which forks the command and answers `pid N` at once, then
`exit CODE` (negative: killed by that signal) when the command has ended.
"""

from __future__ import annotations

import importlib
import json
import locale
import os
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PRELOADED = (
    "sqlalchemy",
    "sqlalchemy.dialects.sqlite",
    "sqlalchemy.dialects.postgresql",
    "click",
    "tqdm",
    "boto3",
    "botocore.config",
    "trio",
    "pyfuse3",
)
MAX_REQUEST = 1 << 20  # bytes of one request: the environment, mostly


def serve(path: str) -> dict[str, Any]:
    """Answer connections forever; returns only in a command's process, with its request."""
    for name in PRELOADED:
        importlib.import_module(name)
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        raise RuntimeError("a preloaded library started a thread: forking would be unsafe")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    while True:
        connection, _ = listener.accept()
        _reap_handlers()
        if os.fork() == 0:
            listener.close()
            return _handle(connection)
        connection.close()


def _reap_handlers() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] != 0:
            pass
    except ChildProcessError:
        pass


def _handle(connection: socket.socket) -> dict[str, Any]:
    """In a handler: receive the request, fork the command, report its pid and exit code."""
    message, fds, _, _ = socket.recv_fds(connection, MAX_REQUEST, 3)
    request = json.loads(message)
    pid = os.fork()
    if pid == 0:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)  # inheritable, as the stdio of a fresh process
            os.close(fd)
        connection.close()
        return request
    for fd in fds:
        os.close(fd)  # the client's pipes see EOF once the command (and what it left) ends
    connection.send(f"pid {pid}".encode())
    _, status = os.waitpid(pid, 0)
    connection.send(f"exit {os.waitstatus_to_exitcode(status)}".encode())
    connection.close()
    os._exit(0)


def run_command(request: dict[str, Any]) -> None:
    """Become `python -m artifactfs ARGS` as the client would have started it."""
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    sys.path[0] = request["cwd"]  # what `python -m` puts first
    sys.argv = ["artifactfs", *request["args"]]  # run_module sets argv[0] to the module's file
    # alter_sys: the module runs as __main__, as under `-m`. Its SystemExit, or an uncaught
    # exception, goes up to the interpreter, which ends the process as it would a fresh one.
    runpy.run_module("artifactfs", run_name="__main__", alter_sys=True)


# -- the client side, in the test process ------------------------------------------------


def _startup_environment(env: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The variables a Python interpreter reads as it starts (locale, I/O encoding, flags):
    a command whose environment differs from the launcher's in these is started fresh."""
    return {
        name: value
        for name, value in env.items()
        if name.startswith(("PYTHON", "LC_")) or name in ("LANG", "LANGUAGE")
    }


class Launcher:
    """A running launcher, and the way to run commands through it."""

    def __init__(self, path: Path, process: subprocess.Popen[bytes]) -> None:
        self.path = path
        self.process = process
        self.startup = _startup_environment(os.environ)

    def can_run(self) -> bool:
        return self.process.poll() is None and _startup_environment(os.environ) == self.startup

    def run(self, args: list[str], cwd: str, timeout: float) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) of `python -m artifactfs ARGS`, as `subprocess.run`
        with `capture_output=True, text=True` gives them; TimeoutExpired as it raises it."""
        deadline = time.monotonic() + timeout
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        stdin = 0 if _is_open(0) else os.open(os.devnull, os.O_RDONLY)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                sock.connect(str(self.path))
                request = {"args": args, "env": dict(os.environ), "cwd": cwd, "umask": _umask()}
                socket.send_fds(sock, [json.dumps(request).encode()], [stdin, out_write, err_write])
                os.close(out_write)
                os.close(err_write)
                out_write = err_write = -1
                sock.settimeout(timeout)
                pid = int(sock.recv(64).split()[1])
                try:
                    output = _read_to_end([out_read, err_read], deadline)
                    sock.settimeout(max(deadline - time.monotonic(), 0.001))
                    answer = sock.recv(64)
                except TimeoutError:
                    os.kill(pid, signal.SIGKILL)
                    raise subprocess.TimeoutExpired(["artifactfs", *args], timeout) from None
        finally:
            for fd in (out_read, err_read, out_write, err_write):
                if fd >= 0:
                    os.close(fd)
            if stdin != 0:
                os.close(stdin)
        if not answer.startswith(b"exit "):
            raise RuntimeError(f"the CLI launcher answered {answer!r}")
        stdout, stderr = (_as_text(output[fd]) for fd in (out_read, err_read))
        return int(answer.split()[1]), stdout, stderr


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _umask() -> int:
    """This process's umask, read without setting it (os.umask would, for every thread)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise RuntimeError("no Umask line in /proc/self/status")


def _read_to_end(fds: list[int], deadline: float) -> dict[int, bytes]:
    """Everything written to each pipe until every writer closed it."""
    chunks: dict[int, list[bytes]] = {fd: [] for fd in fds}
    with selectors.DefaultSelector() as selector:
        for fd in fds:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            for key, _ in selector.select(left):
                data = os.read(key.fd, 1 << 16)
                if data:
                    chunks[key.fd].append(data)
                else:
                    selector.unregister(key.fd)
    return {fd: b"".join(parts) for fd, parts in chunks.items()}


def _as_text(data: bytes) -> str:
    # As subprocess's text mode decodes: the locale's encoding, universal newlines.
    return data.decode(locale.getencoding()).replace("\r\n", "\n").replace("\r", "\n")


@contextmanager
def cli_launcher(directory: Path) -> Iterator[Launcher]:
    """A launcher for this test process, stopped (by its pid) on the way out."""
    path = directory / "launcher.sock"
    repository = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.cli_launcher", str(path)],
        cwd=repository,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            if not selector.select(60) or process.stdout.readline() != b"ready\n":
                raise RuntimeError("the CLI launcher did not start")
        yield Launcher(path, process)
    finally:
        process.terminate()
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()


if __name__ == "__main__":
    run_command(serve(sys.argv[1]))
