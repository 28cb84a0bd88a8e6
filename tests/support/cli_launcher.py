"""A warm interpreter that starts the tests' `artifactfs` commands.

Each command still runs as `python -m artifactfs ARGS` in a process of its own, with the
test's environment (time zone included), working directory, umask and stdio, and exits as a
fresh interpreter does (non-daemon threads joined, atexit handlers run, stdio flushed, a
traceback and exit 1 for an uncaught exception). Only its start differs: it is forked from
this launcher, which has imported SQLAlchemy and click already. Importing SQLAlchemy costs
~0.5 s of CPU, and a run of the suite starts the command ~600 times on two cores.

artifactfs itself is imported in the command's process, after its environment is set, as a
fresh interpreter would. Preloaded are only libraries that read no environment variable at
import and start no thread: not tqdm (TQDM_*), botocore (paths under HOME), google-auth and
wcwidth, which do. What a fork cannot give: the str hash seed is the launcher's, the same
for every command of a session (`ARTIFACTFS_TEST_FRESH_CLI=1` runs them fresh).

Protocol, one command per connection on a Unix SEQPACKET socket: the client sends one JSON
message (args, env, cwd, umask) with its stdin, stdout and stderr as SCM_RIGHTS descriptors.
The launcher forks a handler, which forks the command and answers `pid N` at once, then
`exit CODE` (negative: killed by that signal) when the command has ended. A client that
closes or shuts down its side first (its test failed, timed out or was interrupted) has the
command killed, as `subprocess.run` kills its child then. The launcher ends when its stdin
does: when the test process that started it is gone.
"""

from __future__ import annotations

import contextlib
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

PRELOADED = ("sqlalchemy", "sqlalchemy.dialects.sqlite", "sqlalchemy.dialects.postgresql", "click")
MAX_REQUEST = 1 << 20  # bytes of one request: the environment, mostly
STOP_WAIT = 10.0  # seconds a stopped command's handler has to say that it is gone


# -- the launcher's side ------------------------------------------------------------------


def serve(path: str) -> dict[str, Any] | None:
    """Answer connections until stdin ends (then None); returns a request only in a
    command's process."""
    for name in PRELOADED:
        importlib.import_module(name)
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        raise RuntimeError("a preloaded library started a thread: forking would be unsafe")
    os.close(os.pidfd_open(os.getpid()))  # Linux 5.3 or later: else no launcher, fresh starts
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    with selectors.DefaultSelector() as selector:
        selector.register(listener, selectors.EVENT_READ)
        selector.register(sys.stdin, selectors.EVENT_READ)  # readable: at EOF, nothing is sent
        while True:
            ready = [key.fileobj for key, _ in selector.select()]
            if sys.stdin in ready:
                listener.close()
                os.unlink(path)
                return None
            connection, _ = listener.accept()
            _reap_handlers()
            if os.fork() == 0:
                selector.close()  # its epoll descriptor: a command has only the three of stdio
                listener.close()
                return _handle(connection)
            connection.close()


def _reap_handlers() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] != 0:
            pass


def _handle(connection: socket.socket) -> dict[str, Any]:
    """In a handler: receive the request, fork the command, report its pid and exit code;
    returns only in the command's process."""
    try:
        message, fds, _, _ = socket.recv_fds(connection, MAX_REQUEST, 3)
        request = json.loads(message)
    except (OSError, ValueError):
        os._exit(1)  # the client went away before it asked for anything
    pid = os.fork()
    if pid == 0:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)  # inheritable, as the stdio of a fresh process
            os.close(fd)
        connection.close()
        return request
    try:
        for fd in fds:
            os.close(fd)  # the client's pipes see EOF once the command (and what it left) ends
        pidfd = os.pidfd_open(pid)  # signals reach this process even once it has ended
        try:
            connection.send(f"pid {pid}".encode())
            _wait_unless_abandoned(connection, pidfd)
        except OSError:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        with contextlib.suppress(OSError):
            connection.send(f"exit {os.waitstatus_to_exitcode(status)}".encode())
    finally:
        os._exit(0)


def _wait_unless_abandoned(connection: socket.socket, pidfd: int) -> None:
    """Until the command ends; it is killed if the client closes its side first (the client
    sends nothing after its request, so the connection is readable only then)."""
    with selectors.DefaultSelector() as selector:
        selector.register(pidfd, selectors.EVENT_READ)
        selector.register(connection, selectors.EVENT_READ)
        while True:
            ready = [key.fileobj for key, _ in selector.select()]
            if pidfd in ready:
                return
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            selector.unregister(connection)


def run_command(request: dict[str, Any]) -> None:
    """Become `python -m artifactfs ARGS` as the client would have started it."""
    os.environ.clear()
    os.environ.update(request["env"])
    time.tzset()  # libc and `time` read TZ once, in the launcher
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    sys.path[0] = os.getcwd()  # what `python -m` puts first
    sys.argv = ["artifactfs", *request["args"]]  # run_module sets argv[0] to the module's file
    # alter_sys: the module runs as __main__, as under `-m`. Its SystemExit, or an uncaught
    # exception, goes up to the interpreter, which ends the process as it would a fresh one.
    runpy.run_module("artifactfs", run_name="__main__", alter_sys=True)


# -- the client side, in the test process -----------------------------------------------


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
        with `capture_output=True, text=True` gives them; its errors for a bad `cwd` or
        argument, and TimeoutExpired (the command killed) as it raises it."""
        cwd = os.path.abspath(cwd)
        if not os.path.isdir(cwd):
            raise FileNotFoundError(f"no such directory: {cwd!r}")
        if any("\0" in arg for arg in args):
            raise ValueError("embedded null byte")
        deadline = time.monotonic() + timeout
        output: dict[int, list[bytes]] = {}
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
                try:
                    sock.settimeout(timeout)
                    sock.recv(64)  # `pid N`: the command has started
                    _read_to_end([out_read, err_read], output, deadline)
                    sock.settimeout(max(deadline - time.monotonic(), 0.001))
                    answer = sock.recv(64)
                except BaseException as exc:
                    _stop_command(sock)
                    if not isinstance(exc, TimeoutError):
                        raise
                    expired = subprocess.TimeoutExpired(["artifactfs", *args], timeout)
                    expired.stdout, expired.stderr = (
                        _as_text(b"".join(output.get(fd, []))) for fd in (out_read, err_read)
                    )
                    raise expired from None
        finally:
            for fd in (out_read, err_read, out_write, err_write):
                if fd >= 0:
                    os.close(fd)
            if stdin != 0:
                os.close(stdin)
        if not answer.startswith(b"exit "):
            raise RuntimeError(f"the CLI launcher answered {answer!r}")
        stdout, stderr = (_as_text(b"".join(output[fd])) for fd in (out_read, err_read))
        return int(answer.split()[1]), stdout, stderr


def _stop_command(sock: socket.socket) -> None:
    """Have the handler kill the command, and wait (a little) until it says it is gone."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(STOP_WAIT)
        while sock.recv(64):  # `pid N` if it had not come yet, `exit CODE`, then the end
            pass


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


def _read_to_end(fds: list[int], output: dict[int, list[bytes]], deadline: float) -> None:
    """Everything written to each pipe, into `output[fd]`, until every writer closed it."""
    for fd in fds:
        output[fd] = []
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
                    output[key.fd].append(data)
                else:
                    selector.unregister(key.fd)


def _as_text(data: bytes) -> str:
    # As subprocess's text mode decodes: the preferred encoding (UTF-8 in Python's UTF-8
    # mode, which getencoding() ignores), universal newlines.
    text = data.decode(locale.getpreferredencoding(False))
    return text.replace("\r\n", "\n").replace("\r", "\n")


@contextmanager
def cli_launcher(directory: Path) -> Iterator[Launcher]:
    """A launcher for this test process, stopped on the way out (its stdin closed, then by
    its pid if it does not end)."""
    path = directory / "launcher.sock"
    repository = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.cli_launcher", str(path)],
        cwd=repository,
        stdin=subprocess.PIPE,  # never written: its end tells the launcher to end
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
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


if __name__ == "__main__":
    started = serve(sys.argv[1])
    if started is not None:
        run_command(started)
