"""Run ids under concurrency: many processes creating runs at once in one fresh SQLite store."""

from __future__ import annotations

import itertools
import textwrap
import time
from pathlib import Path

import pytest

import artifactfs
from artifactfs.naming import derive_project_key
from tests.support.concurrent import processes_at_once

# Every test here runs against SQLite and against PostgreSQL.
pytestmark = pytest.mark.store_backends

PROCESSES = 8
RUNS_EACH = 25

CHILD = textwrap.dedent(
    """
    import artifactfs
    store = sys.argv[1]
    wait_for_go(0)  # start together, once every interpreter is up
    for _ in range({runs}):
        run = artifactfs.init_run(project="ml/race", store=store)
        print(run["sys/id"].fetch(), flush=True)
        run.stop()
    """
).format(runs=RUNS_EACH)


def test_concurrent_processes_get_distinct_gap_free_ids(tmp_path: Path) -> None:
    store = tmp_path / "fresh" / "race.db"
    started = time.monotonic()
    outputs = processes_at_once(tmp_path, CHILD, [str(store)], PROCESSES, timeout=90)
    ids = [line for out in outputs for line in out.split()]
    assert len(ids) == PROCESSES * RUNS_EACH
    assert len(set(ids)) == len(ids), "duplicate run ids"
    key = derive_project_key("race")
    assert sorted(ids, key=lambda i: int(i.rsplit("-", 1)[1])) == [
        f"{key}-{n}" for n in range(1, PROCESSES * RUNS_EACH + 1)
    ]
    spans = sorted(
        (min(n), max(n))
        for n in ([int(i.rsplit("-", 1)[1]) for i in out.split()] for out in outputs)
    )
    overlapping = any(a[1] > b[0] for a, b in itertools.pairwise(spans))
    assert overlapping, f"the processes ran one after another, not at once: {spans}"
    for out in outputs:  # each process saw its own ids in increasing order
        numbers = [int(i.rsplit("-", 1)[1]) for i in out.split()]
        assert numbers == sorted(numbers)
    # The store agrees, and the next run continues the sequence.
    listed = artifactfs.init_run(project="ml/race", store=str(store))
    assert listed["sys/id"].fetch() == f"{key}-{PROCESSES * RUNS_EACH + 1}"
    assert time.monotonic() - started < 60
