"""Work released at once: threads by a barrier (`run_at_once`), or processes from start lines
on disk (`processes_at_once`, with `WAIT_FOR_GO` in their script)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def run_at_once(
    work: Callable[[int], bytes], count: int = 8, timeout: float = 60
) -> list[bytes | BaseException]:
    barrier = threading.Barrier(count, timeout=10)
    results: list[bytes | BaseException] = [b""] * count

    def run(index: int) -> None:
        try:
            barrier.wait()
            results[index] = work(index)
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return results


# The start of a child script for `processes_at_once`: `wait_for_go(n)` waits at start line n
# (the go path is the script's last argument).
WAIT_FOR_GO = """
import os, sys, time

def wait_for_go(barrier):
    go = sys.argv[-1] + "-" + str(barrier)
    open(go + "." + str(os.getpid()), "w").close()  # this process is at the start line
    deadline = time.monotonic() + 60
    while not os.path.exists(go):  # all go at once, once every process is there
        if time.monotonic() > deadline:
            sys.exit("never told to go")
        time.sleep(0.001)
"""


def processes_at_once(
    directory: Path,
    script: str,
    args: Sequence[str],
    count: int = 8,
    barriers: int = 1,
    timeout: float = 120,
) -> list[str]:
    """`count` interpreters running `WAIT_FOR_GO + script` with `args` (then the go path),
    released together from each of `barriers` start lines in turn: their outputs, once every
    one has succeeded without a traceback."""
    go = directory / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", WAIT_FOR_GO + script, *args, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    try:
        for barrier in range(barriers):
            give_up = time.monotonic() + 60
            while time.monotonic() < give_up:
                if len(list(directory.glob(f"go-{barrier}.*"))) == count:
                    break
                if any(child.poll() is not None for child in children):
                    break  # one failed: its output says why, below
                time.sleep(0.001)
            (directory / f"go-{barrier}").touch()
        results = [(child.communicate(timeout=timeout), child.returncode) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    for (_out, err), returncode in results:
        assert returncode == 0, err
        assert "Traceback" not in err, err
    return [out for (out, _err), _ in results]
