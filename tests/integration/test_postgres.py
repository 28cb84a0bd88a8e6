"""The team store on PostgreSQL: many hosts track and mount the same runs."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import update

import artifactfs
from artifactfs.entries import ArtifactFileData
from artifactfs.errors import ArtifactfsError
from artifactfs.naming import derive_project_key, parse_project
from artifactfs.store import Store, schema
from tests.conftest import make_tree
from tests.support.mounts import mounted
from tests.support.postgres import PostgresServer, postgres_server

HOST_SCRIPT = """
import os, sys, artifactfs
os.environ["XDG_CACHE_HOME"] = sys.argv[2]  # each "host" has its own cache directory
ids = [artifactfs.init_run(project="team/race", store=sys.argv[1]).id for _ in range(50)]
print(" ".join(ids))
"""


def test_four_hosts_creating_runs_at_once_get_distinct_gap_free_ids(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    uri = postgres.uri(postgres.create_database())
    Store(uri).close()  # schema in place, so the hosts race on run ids, not on set-up
    hosts = [
        subprocess.Popen(
            [sys.executable, "-c", HOST_SCRIPT, uri, str(tmp_path / f"host{n}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    ids: list[str] = []
    for host in hosts:
        out, err = host.communicate(timeout=240)
        assert host.returncode == 0, err
        ids += out.split()
    assert len(ids) == 200
    key = derive_project_key("race")
    assert sorted(ids, key=lambda i: int(i.split("-")[1])) == [f"{key}-{n}" for n in range(1, 201)]


def test_a_new_run_with_a_large_field_holds_up_no_other_run_of_its_project(
    postgres: PostgresServer,
) -> None:
    """`track` without --run writes the run and its field in one transaction. It took the
    run number (which locks the project's row) before inserting the entries, so every other
    job's `init_run` in that project waited for the whole insert."""
    uri = postgres.uri(postgres.create_database())
    project = parse_project("ml/big")
    store, other = Store(uri), Store(uri)
    try:
        store.create_run(project)  # the project exists
        entries = [
            ArtifactFileData(f"d{i % 100}/f{i:06d}.bin", f"{i:040x}", "Local", i, {})
            for i in range(60_000)
        ]
        ended: list[str] = []
        big = threading.Thread(
            target=lambda: (
                store.create_run_with_field(project, "data", entries),
                ended.append("big"),
            )
        )
        big.start()
        time.sleep(1.0)  # the big insert is under way (it takes seconds)
        assert big.is_alive(), "the insert ended before the other job started: too few entries"
        ended.append(f"other {other.create_run(project).run_id}")
        big.join(120)
        key = derive_project_key("big")
        assert ended == [f"other {key}-2", "big"]  # the other job did not wait for it
        assert [(r.run_id, r.fields) for r in other.list_runs(project)] == [
            (f"{key}-1", ()),
            (f"{key}-2", ()),
            (f"{key}-3", ("data",)),  # its number taken once its entries were in
        ]
    finally:
        store.close()
        other.close()


def test_two_daemons_see_a_new_run_within_seconds_and_read_the_same_bytes(
    postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = postgres.uri(postgres.create_database())
    monkeypatch.setenv("ARTIFACTFS_STORE", uri)  # the daemons inherit it
    first = make_tree(tmp_path / "first", {"a.csv": b"1,2\n", "sub/b.bin": os.urandom(70_000)})
    artifactfs.init_run(project="team/cls")["data"].track_files(str(first))
    with (
        mounted(tmp_path / "host1", "--cache-dir", str(tmp_path / "cache1")) as one,
        mounted(tmp_path / "host2", "--cache-dir", str(tmp_path / "cache2")) as two,
    ):
        assert sorted(os.listdir(one.path / "team" / "cls")) == ["CLS-1"]
        later = make_tree(tmp_path / "later", {"c.txt": b"tracked while mounted"})
        run = artifactfs.init_run(project="team/cls")
        run["data"].track_files(str(later))
        for mount in (one, two):
            run_dir = mount.path / "team" / "cls" / run.id
            deadline = time.monotonic() + 5
            while not run_dir.exists():
                assert time.monotonic() < deadline, f"{run.id} not in {mount.path} after 5 s"
                time.sleep(0.1)
        for rel in ("CLS-1/data/a.csv", "CLS-1/data/sub/b.bin", f"{run.id}/data/c.txt"):
            left = (one.path / "team" / "cls" / rel).read_bytes()
            right = (two.path / "team" / "cls" / rel).read_bytes()
            assert left == right
        assert (one.path / "team/cls/CLS-1/data/sub/b.bin").read_bytes() == (
            first / "sub" / "b.bin"
        ).read_bytes()


def test_daemon_survives_the_database_going_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Open files keep reading; new lookups fail with EIO; all works again after a restart."""
    with postgres_server() as server:  # its own server: this test stops it
        uri = server.uri(server.create_database())
        monkeypatch.setenv("ARTIFACTFS_STORE", uri)
        body = os.urandom(300_000)
        data = make_tree(tmp_path / "data", {"open.bin": body, "later.txt": b"looked up later"})
        run = artifactfs.init_run(project="team/outage")
        run["data"].track_files(str(data))
        with mounted(tmp_path / "mnt", "--cache-dir", str(tmp_path / "cache")) as mount:
            base = mount.path / "team" / "outage" / run.id / "data"
            with open(base / "open.bin", "rb") as handle:
                assert handle.read(1000) == body[:1000]
                server.stop()
                try:
                    # An open file goes on (it needs no database).
                    assert handle.read() == body[1000:]
                    # A lookup the kernel has not cached needs the store: EIO, not a hang.
                    with pytest.raises(OSError) as raised:
                        os.stat(mount.path / "team" / "outage" / "NEW-1")
                    assert raised.value.errno == errno.EIO
                    assert "EIO" in mount.log() or "failed" in mount.log()
                finally:
                    server.start()
            # Back without a remount: the daemon reconnects by itself.
            assert (base / "later.txt").read_bytes() == b"looked up later"
            newer = artifactfs.init_run(project="team/outage")
            newer["data"].track_files(str(data))
            deadline = time.monotonic() + 5
            while not (mount.path / "team" / "outage" / newer.id).exists():
                assert time.monotonic() < deadline
                time.sleep(0.1)


def server_processes(server: PostgresServer) -> list[int]:
    """The server's postmaster and its children (the backends serving connections)."""
    postmaster = int((server.data_dir / "postmaster.pid").read_text().split()[0])
    children = subprocess.run(
        ["pgrep", "-P", str(postmaster)], capture_output=True, text=True, check=False
    ).stdout.split()
    return [postmaster, *map(int, children)]


def test_a_lookup_the_frozen_database_never_answers_fails_with_eio_in_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that stops answering (frozen, or a network dropping its packets) is not one
    that refuses connections: a lookup waited on it for good, and the program with it, which
    not even SIGKILL could end. It fails with EIO within the read deadline now."""
    with postgres_server() as server:  # its own server: this test freezes it
        uri = server.uri(server.create_database())
        monkeypatch.setenv("ARTIFACTFS_STORE", uri)
        data = make_tree(tmp_path / "data", {"a.txt": b"a"})
        run = artifactfs.init_run(project="team/frozen")
        run["data"].track_files(str(data))
        deadline = 3.0
        with mounted(
            tmp_path / "mnt", "--cache-dir", str(tmp_path / "cache"), "--read-deadline", "3"
        ) as mount:
            project = mount.path / "team" / "frozen"
            assert (project / run.id / "data" / "a.txt").read_bytes() == b"a"
            frozen = server_processes(server)
            outcome: list[BaseException | None] = []

            def look_up() -> None:
                try:
                    os.stat(project / "NEW-1")
                    outcome.append(None)
                except OSError as exc:
                    outcome.append(exc)

            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            try:
                began = time.monotonic()
                looking = threading.Thread(target=look_up)
                looking.start()
                looking.join(deadline + 20)
                took = time.monotonic() - began
            finally:
                for pid in frozen:
                    os.kill(pid, signal.SIGCONT)
            looking.join(60)
            assert outcome and isinstance(outcome[0], OSError), outcome
            assert outcome[0].errno == errno.EIO, outcome
            assert took < deadline + 10, f"EIO after {took:.1f}s"
            assert "no answer from the store" in mount.log()
            # Answering again: no remount needed.
            later = artifactfs.init_run(project="team/frozen")
            later["data"].track_files(str(data))
            assert (project / later.id / "data" / "a.txt").read_bytes() == b"a"


@pytest.mark.store_backends
def test_a_store_of_a_newer_schema_is_refused(cli) -> None:
    Store().close()
    store = Store()
    with store.engine.begin() as conn:
        conn.execute(
            update(schema.meta).where(schema.meta.c.key == "schema_version").values(value="99")
        )
    store.close()
    with pytest.raises(ArtifactfsError, match="schema version 99, newer"):
        Store()
    result = cli("runs")
    assert result.returncode == 2
    assert "newer than this artifactfs understands" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_errors_never_show_the_database_password(cli, postgres: PostgresServer) -> None:
    result = cli("--store", postgres.uri("no_such_database"), "runs")
    assert result.returncode == 2
    assert "test-password" not in result.stderr
    assert "***" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # libpq takes it as a query parameter too: it was shown so, in errors and the mount's log.
    user, _, host = postgres.uri("no_such_database").partition("@")
    in_query = f"{user.rpartition(':')[0]}@{host}?password=test-password"
    result = cli("--store", in_query, "runs")
    assert result.returncode == 2
    assert "test-password" not in result.stderr and "password=***" in result.stderr, result
