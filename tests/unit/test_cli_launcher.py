"""The tests' warm launcher starts a command as a fresh `python -m artifactfs` would: the
test's environment and time zone, exit codes and tracebacks, output, and a command killed
when its test gives up on it. A stand-in `artifactfs` package in the command's working
directory (first on `python -m`'s path) shows what the command sees."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli_launcher import Launcher, cli_launcher

STAND_IN = """
import atexit, os, sys, threading, time
command = sys.argv[1]
if command == "env":
    print(os.environ.get("ARTIFACTFS_PROJECT"), time.tzname[0], oct(os.umask(0)), os.getcwd())
elif command == "exit":
    atexit.register(lambda: print("atexit ran"))
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread ended"))).start()
    print("line one\\r\\nline two", end="")
    sys.exit(int(sys.argv[2]))
elif command == "fail":
    raise ValueError("a bug")
elif command == "sleep":
    print(os.getpid(), flush=True)
    time.sleep(60)
"""


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    with cli_launcher(tmp_path) as started:
        yield started


@pytest.fixture
def workdir(tmp_path: Path) -> str:
    package = tmp_path / "work" / "artifactfs"
    package.mkdir(parents=True)
    (package / "__main__.py").write_text(STAND_IN)
    return str(package.parent)


def test_a_command_sees_the_tests_environment_time_zone_umask_and_directory(
    launcher: Launcher, workdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARTIFACTFS_PROJECT", "set/by-the-test")
    monkeypatch.setenv("TZ", "Asia/Kolkata")  # read once by libc: the launcher's is UTC
    old_umask = os.umask(0o027)
    try:
        code, stdout, stderr = launcher.run(["env"], workdir, 30)
    finally:
        os.umask(old_umask)
    assert (code, stderr) == (0, "")
    assert stdout.split() == ["set/by-the-test", "IST", "0o27", workdir]


def test_exit_codes_threads_atexit_and_newlines_as_a_fresh_interpreter(
    launcher: Launcher, workdir: str
) -> None:
    fresh = subprocess.run(
        [sys.executable, "-m", "artifactfs", "exit", "3"],
        capture_output=True,
        text=True,
        cwd=workdir,
        timeout=60,
    )
    assert launcher.run(["exit", "3"], workdir, 30) == (fresh.returncode, fresh.stdout, "")
    assert fresh.returncode == 3
    assert fresh.stdout == "line one\nline twothread ended\natexit ran\n"


def test_an_uncaught_exception_is_a_traceback_and_exit_1(launcher: Launcher, workdir: str) -> None:
    code, stdout, stderr = launcher.run(["fail"], workdir, 30)
    assert (code, stdout) == (1, "")
    assert "Traceback" in stderr
    assert stderr.endswith("ValueError: a bug\n")


def test_a_command_past_its_timeout_is_killed(launcher: Launcher, workdir: str) -> None:
    began = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as expired:
        launcher.run(["sleep"], workdir, 1.0)
    assert time.monotonic() - began < 15
    pid = int(expired.value.stdout)
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped before the error


def test_a_launcher_whose_test_process_is_gone_ends(tmp_path: Path) -> None:
    with cli_launcher(tmp_path) as started:
        process = started.process
    assert process.returncode == 0  # its stdin closed: it ended by itself, not by a signal
    assert not (tmp_path / "launcher.sock").exists()
