"""Run ids under concurrency: many processes creating runs at once in one fresh SQLite store."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import artifactfs
from artifactfs.naming import derive_project_key

# Every test here runs against SQLite and against PostgreSQL.
pytestmark = pytest.mark.store_backends

PROCESSES = 8
RUNS_EACH = 25

CHILD = textwrap.dedent(
    """
    import os, sys, time
    store, go = sys.argv[1], sys.argv[2]
    import artifactfs
    open(go + "." + str(os.getpid()), "w").close()  # this interpreter is up
    deadline = time.monotonic() + 60
    while not os.path.exists(go):  # start together, once every interpreter is up
        if time.monotonic() > deadline:
            sys.exit("never told to go")
        time.sleep(0.005)
    for _ in range({runs}):
        run = artifactfs.init_run(project="ml/race", store=store)
        print(run["sys/id"].fetch(), flush=True)
        run.stop()
    """
).format(runs=RUNS_EACH)


def test_concurrent_processes_get_distinct_gap_free_ids(tmp_path: Path) -> None:
    store = tmp_path / "fresh" / "race.db"
    go = tmp_path / "go"
    started = time.monotonic()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(store), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    # Every interpreter imports artifactfs and reaches the starting line, then all go at once.
    give_up = time.monotonic() + 60
    while len(list(tmp_path.glob("go.*"))) < PROCESSES and time.monotonic() < give_up:
        if any(child.poll() is not None for child in children):
            break  # one failed: its output says why, below
        time.sleep(0.01)
    go.touch()
    outputs = []
    try:
        for child in children:
            out, err = child.communicate(timeout=90)
            outputs.append((child.returncode, out, err))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    for returncode, _out, err in outputs:
        assert returncode == 0, err
        assert "Traceback" not in err, err
    ids = [line for _, out, _ in outputs for line in out.split()]
    assert len(ids) == PROCESSES * RUNS_EACH
    assert len(set(ids)) == len(ids), "duplicate run ids"
    key = derive_project_key("race")
    assert sorted(ids, key=lambda i: int(i.rsplit("-", 1)[1])) == [
        f"{key}-{n}" for n in range(1, PROCESSES * RUNS_EACH + 1)
    ]
    spans = sorted(
        (min(n), max(n))
        for n in ([int(i.rsplit("-", 1)[1]) for i in out.split()] for _, out, _ in outputs)
    )
    overlapping = any(a[1] > b[0] for a, b in itertools.pairwise(spans))
    assert overlapping, f"the processes ran one after another, not at once: {spans}"
    for _, out, _ in outputs:  # each process saw its own ids in increasing order
        numbers = [int(i.rsplit("-", 1)[1]) for i in out.split()]
        assert numbers == sorted(numbers)
    # The store agrees, and the next run continues the sequence.
    listed = artifactfs.init_run(project="ml/race", store=str(store))
    assert listed["sys/id"].fetch() == f"{key}-{PROCESSES * RUNS_EACH + 1}"
    assert time.monotonic() - started < 60
