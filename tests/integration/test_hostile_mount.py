"""A store written by someone else, through a real mount (and `download`): hostile rows are
planted with sqlite3, bypassing every check tracking makes.

Rows: `..`, absolute paths, empty segments, NUL, 300-byte names, a path that is both a file and
a directory, hostile workspaces, projects, runs and fields, and sizes that are negative, absurd,
larger or smaller than the real object. The mount must neither show nor serve anything outside
the artifact tree, must stay self-consistent, never serve bytes other than the tracked ones,
answer every call in bounded time, and keep running; `download` must write nothing outside its
destination and leave no partial file. `tests/unit/test_tree.py` drives the same kind of rows
through `Tree` without FUSE; `tests/integration/test_hostile_store.py` through `download`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import artifactfs
from artifactfs.entries import path_problem
from artifactfs.fs.tree import MAX_ENTRY_SIZE
from artifactfs.store import Store, default_store_path
from tests.conftest import make_tree
from tests.integration.test_faults import Readers, read_file
from tests.support.mounts import Mount, mounted, pid_alive

pytestmark = pytest.mark.s3  # the store holds an S3 entry

PAYLOAD = b"planted bytes\n"
CALL_BOUND = 10.0  # seconds any single call on the mount may take
ABSURD = 2**63 - 1
LEGIT = {"a/ok.txt": b"ok\n", "top.txt": b"top\n"}

# (file_path, parent, name): every hostile name contains "evil", so a walk can spot it.
HOSTILE_ENTRIES = [
    ("../evil1", "", "evil1"),
    ("../evil1b", "", "../evil1b"),
    ("/evil2", "", "evil2"),
    ("/tmp/evil2b", "/tmp", "evil2b"),
    ("a//evil3", "a", "evil3"),
    ("a//evil3b", "a/", "evil3b"),
    ("evil4\x00.txt", "", "evil4\x00.txt"),
    ("x\x00evil4b", "", "evil4b"),
    ("evil5" * 60, "", "evil5" * 60),  # a 300-byte name
    ("a/" + "evil5b" * 50, "a", "evil5b" * 50),
    ("./evil6", "", "evil6"),
    ("ok/../../evil7", "", "evil7"),
    ("a/../evil8", "a", "evil8"),
    ("", "", ""),
    ("evil9/", "evil9", ""),
]
HOSTILE_DIRS = [
    ("../evild1", "", "evild1"),
    ("/evild2", "", "evild2"),
    ("a//evild3", "a", "evild3"),
    ("evild4\x00", "", "evild4\x00"),
    ("evild5" * 50, "", "evild5" * 50),
    ("a/../evild6", "a", "evild6"),
]
HOSTILE_FIELDS = ["../evilf1", "/evilf2", "ns//evilf3", "..", "evilf4\x00", "evilf5" * 50]
# (workspace, project, key): projects that must not show, with one run each
HOSTILE_PROJECTS = [
    ("..", "evilp1", "EA"),
    ("default", "../evilp2", "EB"),
    ("default", "evilp3/../../x", "EC"),
    ("/evilws", "p", "ED"),
    ("default", "evilp5" * 50, "EE"),
    ("evil\x00ws", "p", "EF"),
]
HOSTILE_RUN_KEYS = ["../EVILR-1", "EVILR/2", "EVILR-3\x00", "/EVILR-4"]


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def artifact_id_of(run_id: str, field: str) -> str:
    store = Store(str(default_store_path()))
    try:
        return store.field_artifact(store.get_run(run_id), field).id
    finally:
        store.close()


def insert_entry(
    conn: sqlite3.Connection,
    artifact: str,
    row: tuple[str, str, str],
    file_hash: str,
    type_name: str,
    size: int | None,
    metadata: dict[str, str],
) -> None:
    file_path, parent, name = row
    conn.execute(
        "INSERT INTO artifact_entries (artifact_id, file_path, parent, name, file_hash, type,"
        " size, metadata_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (artifact, file_path, parent, name, file_hash, type_name, size, json.dumps(metadata)),
    )


@pytest.fixture
def hostile_store(tmp_path: Path, s3: Any) -> dict[str, Any]:
    """Run H-1: `data` (legit local files plus hostile rows), `sizes` (one S3 object tracked,
    plus rows naming it with wrong sizes), `local-sizes` (the same for a local file); hostile
    fields, projects and runs around it."""
    data = make_tree(tmp_path / "legit", LEGIT)
    payload = make_tree(tmp_path / "payload", {"p.bin": PAYLOAD}) / "p.bin"
    real = os.urandom(200_000)
    s3.put("obj/exact.bin", real)
    local_real = make_tree(tmp_path / "local-real", {"exact.bin": real}) / "exact.bin"
    run = artifactfs.init_run(project="hostile", project_key="H")
    run["data"].track_files(str(data))
    run["sizes"].track_files(s3.url("obj/exact.bin"))
    run["local-sizes"].track_files(str(local_real))
    run.stop()
    assert run.id == "H-1"
    data_id = artifact_id_of("H-1", "data")
    sizes_id = artifact_id_of("H-1", "sizes")
    local_sizes_id = artifact_id_of("H-1", "local-sizes")
    (s3_entry,) = artifactfs.init_run(with_id="H-1", mode="read-only")["sizes"].fetch_files_list()
    local_meta = {"file_path": f"file://{payload}", "last_modified": "2024-01-01 00:00:00"}
    sizes = {
        "negative.bin": -5,
        "absurd.bin": ABSURD,
        "bigger.bin": len(real) + 100,
        "smaller.bin": len(real) - 100,
    }

    conn = sqlite3.connect(default_store_path())
    try:
        with conn:
            for row in HOSTILE_ENTRIES:
                insert_entry(conn, data_id, row, sha1(PAYLOAD), "Local", len(PAYLOAD), local_meta)
            for path, parent, name in HOSTILE_DIRS:
                conn.execute(
                    "INSERT INTO artifact_dirs (artifact_id, path, parent, name) VALUES (?,?,?,?)",
                    (data_id, path, parent, name),
                )
            # `x` is a file and a directory (holding `y`) at once.
            for row in (("x", "", "x"), ("x/y", "x", "y")):
                insert_entry(conn, data_id, row, sha1(PAYLOAD), "Local", len(PAYLOAD), local_meta)
            conn.execute(
                "INSERT INTO artifact_dirs (artifact_id, path, parent, name) VALUES (?,?,?,?)",
                (data_id, "x", "", "x"),
            )
            for name, size in sizes.items():
                insert_entry(
                    conn,
                    sizes_id,
                    (name, "", name),
                    s3_entry.file_hash,
                    "S3",
                    size,
                    dict(s3_entry.metadata),
                )
                insert_entry(
                    conn,
                    local_sizes_id,
                    (name, "", name),
                    sha1(real),
                    "Local",
                    size,
                    {"file_path": f"file://{local_real}", "last_modified": "2024-01-01 00:00:00"},
                )
            (run_pk, project_pk) = conn.execute(
                "SELECT id, project_id FROM runs WHERE run_key = 'H-1'"
            ).fetchone()
            for field in HOSTILE_FIELDS:
                conn.execute(
                    "INSERT INTO fields (run_id, path, artifact_id, updated_at) VALUES (?,?,?,?)",
                    (run_pk, field, data_id, "2024-01-01 00:00:00"),
                )
            for number, key in enumerate(HOSTILE_RUN_KEYS, start=90):
                conn.execute(
                    "INSERT INTO runs (project_id, number, run_key, created_at) VALUES (?,?,?,?)",
                    (project_pk, number, key, "2024-01-01 00:00:00"),
                )
            for workspace, name, key in HOSTILE_PROJECTS:
                cursor = conn.execute(
                    "INSERT INTO projects (workspace, name, key, last_number, created_at)"
                    " VALUES (?,?,?,?,?)",
                    (workspace, name, key, 1, "2024-01-01 00:00:00"),
                )
                conn.execute(
                    "INSERT INTO runs (project_id, number, run_key, created_at) VALUES (?,?,?,?)",
                    (cursor.lastrowid, 1, f"{key}-1", "2024-01-01 00:00:00"),
                )
                conn.execute(
                    "INSERT INTO fields (run_id, path, artifact_id, updated_at)"
                    " SELECT id, 'data', ?, '2024-01-01 00:00:00' FROM runs WHERE run_key = ?",
                    (data_id, f"{key}-1"),
                )
    finally:
        conn.close()
    return {"real": real, "sizes": sizes, "payload": payload, "tmp": tmp_path}


def walk(root: Path) -> tuple[dict[str, str], list[str]]:
    """relative path -> 'dir' | 'file' | other, for everything a walk of the mount shows,
    and the errors met (each listing bounded by the walk itself)."""
    shown: dict[str, str] = {}
    errors: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: errors.append(str(e))):
        here = Path(dirpath)
        for name in dirnames + filenames:
            path = here / name
            rel = str(path.relative_to(root))
            try:
                mode = os.lstat(path).st_mode
            except OSError as exc:
                errors.append(f"lstat {rel}: {exc}")
                continue
            shown[rel] = "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"
    return shown, errors


def bounded(call: Any, timeout: float = CALL_BOUND) -> tuple[str, Any]:
    """('ok', value) | ('error', errno) | ('hung', None): one call on the mount, in a thread."""
    readers = Readers()
    box: dict[str, Any] = {}

    def run() -> bytes:
        box["value"] = call()
        return b""

    readers.start("call", run)
    if readers.wait(timeout):
        return "hung", None
    outcome = readers.outcomes["call"]
    if outcome.errno is not None:
        return "error", outcome.errno
    return "ok", box.get("value")


def all_xattrs(path: Path) -> dict[str, bytes]:
    """What `getfattr -d -m - PATH` asks: the list of names, then each value."""
    return {name: os.getxattr(path, name) for name in os.listxattr(path)}


# -- the artifact's own tree -----------------------------------------------------------------


def test_hostile_rows_are_neither_shown_nor_served_through_the_mount(
    hostile_store: dict[str, Any], tmp_path: Path
) -> None:
    with mounted(tmp_path / "mnt", "--run", "H-1", "--field", "data") as mount:
        shown, errors = walk(mount.path)
        assert not errors, errors
        evil = sorted(path for path in shown if "evil" in path)
        assert not evil, f"hostile rows shown: {evil}"
        for rel in shown:
            assert path_problem(rel) is None, rel
            real = os.path.realpath(mount.path / rel)
            assert real.startswith(str(mount.path) + "/"), (rel, real)
        legit_shown = {rel: kind for rel, kind in shown.items() if rel != "x" and rel != "x/y"}
        assert legit_shown == {"a": "dir", "a/ok.txt": "file", "top.txt": "file"}
        for rel, body in LEGIT.items():
            assert (mount.path / rel).read_bytes() == body

        # A hostile row under a harmless-looking name is not found by name either.
        found = []
        for kind, rows in (("entry", HOSTILE_ENTRIES), ("dir", HOSTILE_DIRS)):
            for stored, parent, name in rows:
                if "\x00" in parent + name or not name or parent.startswith("/"):
                    continue
                target = mount.path / parent / name if parent else mount.path / name
                if not str(target).startswith(str(mount.path) + "/") or ".." in (parent, name):
                    continue  # the kernel resolves these itself; the daemon never sees them
                status, value = bounded(lambda t=target: os.lstat(t))
                if status != "error" or value not in (errno.ENOENT, errno.ENAMETOOLONG):
                    found.append(
                        f"{kind} {stored!r} at {target.relative_to(mount.path)}: {status} {value}"
                    )
        assert not found, found

        # `x` is both a file and a directory in the store: whatever the mount shows, it says
        # the same thing to a lookup and to a listing, and serves only the planted bytes.
        _check_file_and_directory(mount, shown)
        assert pid_alive(mount.pid)
        assert (mount.path / "top.txt").read_bytes() == LEGIT["top.txt"]


def _check_file_and_directory(mount: Mount, shown: dict[str, str]) -> None:
    kind = shown.get("x")
    assert kind in ("file", "dir", None), kind
    if kind is None:
        return
    listed_dir = any(e.name == "x" and e.is_dir() for e in os.scandir(mount.path))
    looked_up_dir = stat.S_ISDIR(os.stat(mount.path / "x").st_mode)
    assert listed_dir == looked_up_dir == (kind == "dir"), (
        f"listing says {'dir' if listed_dir else 'file'}, "
        f"lookup says {'dir' if looked_up_dir else 'file'}"
    )
    if kind == "dir":
        assert os.listdir(mount.path / "x") in ([], ["y"])
        if shown.get("x/y"):
            assert (mount.path / "x" / "y").read_bytes() == PAYLOAD
    else:
        assert (mount.path / "x").read_bytes() == PAYLOAD


def test_file_and_directory_at_one_path_looks_the_same_to_lookup_and_listing(
    hostile_store: dict[str, Any], tmp_path: Path
) -> None:
    """In a fresh mount, a lookup first (`stat x`), then the listing: both must agree."""
    with mounted(tmp_path / "mnt", "--run", "H-1", "--field", "data") as mount:
        status, info = bounded(lambda: os.stat(mount.path / "x"))
        assert status in ("ok", "error"), status
        looked_up = (
            ("dir" if stat.S_ISDIR(info.st_mode) else "file") if status == "ok" else "absent"
        )
        listed = {e.name: ("dir" if e.is_dir() else "file") for e in os.scandir(mount.path)}
        assert listed.get("x", "absent") == looked_up, (
            f"stat says x is {looked_up}, the listing says {listed.get('x', 'absent')}"
        )
        assert pid_alive(mount.pid)


# -- the store's upper levels --------------------------------------------------------------------


def test_hostile_workspaces_projects_runs_and_fields_are_not_shown(
    hostile_store: dict[str, Any], tmp_path: Path
) -> None:
    with mounted(tmp_path / "mnt") as mount:
        top = sorted(os.listdir(mount.path))
        assert top == ["default"], top
        assert sorted(os.listdir(mount.path / "default")) == ["hostile"]
        assert sorted(os.listdir(mount.path / "default" / "hostile")) == ["H-1"]
        run_dir = mount.path / "default" / "hostile" / "H-1"
        assert sorted(os.listdir(run_dir)) == ["data", "local-sizes", "sizes"]
        shown, errors = walk(mount.path)
        assert not errors, errors
        evil = sorted(p for p in shown if "evil" in p.lower())
        assert not evil, f"hostile rows shown: {evil}"
        project_dir = run_dir.parent
        for parent, name in [
            (run_dir, "evilf1"),
            (run_dir, "evilf2"),
            (run_dir, "ns"),
            (project_dir, "EVILR-3"),
            (mount.path / "default", "evilp2"),
            (mount.path, "evilws"),
        ]:
            status, value = bounded(lambda t=parent / name: os.lstat(t))
            assert (status, value) == ("error", errno.ENOENT), (name, status, value)
        assert pid_alive(mount.pid)


# -- sizes that do not match the object ----------------------------------------------------------


@pytest.mark.parametrize("field", ["sizes", "local-sizes"])
def test_wrong_sizes_are_never_served_and_every_call_answers(
    hostile_store: dict[str, Any], tmp_path: Path, field: str
) -> None:
    real: bytes = hostile_store["real"]
    sizes: dict[str, int] = hostile_store["sizes"]
    with mounted(tmp_path / "mnt", "--run", "H-1", "--field", field, "--chunk-size", "1M") as mount:
        # Sizes no object can have (negative, over 5 TiB) are not shown at all.
        possible = {name: size for name, size in sizes.items() if 0 <= size <= MAX_ENTRY_SIZE}
        assert sorted(os.listdir(mount.path)) == sorted(["exact.bin", *possible])
        for name in sizes.keys() - possible.keys():
            assert not (mount.path / name).exists()
        assert (mount.path / "exact.bin").read_bytes() == real
        problems = []
        for name, size in possible.items():
            path = mount.path / name
            status, info = bounded(lambda p=path: os.stat(p))
            if status != "ok":
                problems.append(f"stat {name}: {status} {info}")
                continue
            if size >= 0 and info.st_size != size:
                problems.append(f"stat {name}: st_size {info.st_size}, tracked {size}")
            status, data = bounded(lambda p=path: read_file(p))
            # The only right answers: EIO, or (for a negative size, shown as empty) nothing.
            if status == "ok" and not (size < 0 and data == b""):
                problems.append(f"read {name}: served {len(data)} bytes")
            elif status == "error" and data != errno.EIO:
                problems.append(f"read {name}: {errno.errorcode.get(data, data)}, not EIO")
            elif status == "hung":
                problems.append(f"read {name}: no answer within {CALL_BOUND:.0f}s")
            # In a thread: a FUSE call the daemon never answers cannot be interrupted, even by
            # SIGKILL; the thread is released when the mount is torn down.
            status, values = bounded(lambda p=path: all_xattrs(p))
            if status == "hung":
                problems.append(f"getfattr -d {name}: no answer within {CALL_BOUND:.0f}s")
            elif status == "error":
                problems.append(f"getfattr -d {name}: {errno.errorcode.get(values, values)}")
        assert pid_alive(mount.pid), "the daemon died"
        assert (mount.path / "exact.bin").read_bytes() == real
        assert not problems, problems


def test_download_of_wrong_sizes_fails_cleanly_and_writes_nothing_else(
    hostile_store: dict[str, Any], tmp_path: Path
) -> None:
    dest = tmp_path / "out" / "dest"
    dest.parent.mkdir()
    for field in ("sizes", "local-sizes"):
        result = subprocess.run(
            [sys.executable, "-m", "artifactfs", "download", "H-1", field, str(dest / field)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 1, result
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        for name in hostile_store["sizes"]:
            assert name in result.stderr, (name, result.stderr)
        written = sorted(p.name for p in (dest / field).rglob("*"))
        assert written == ["exact.bin"], f"{field}: {written}"
        assert (dest / field / "exact.bin").read_bytes() == hostile_store["real"]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["dest"]


def test_download_of_the_hostile_artifact_writes_nothing_outside(
    hostile_store: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "dest"
    before = sorted(str(p) for p in tmp_path.rglob("*") if "home" not in p.parts)
    result = subprocess.run(
        [sys.executable, "-m", "artifactfs", "download", "H-1", "data", str(dest)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    after = sorted(
        str(p) for p in tmp_path.rglob("*") if "home" not in p.parts and dest not in p.parents
    )
    assert [p for p in after if p != str(dest)] == [p for p in before if p != str(dest)]
    assert not os.path.lexists("/evil2") and not os.path.lexists("/tmp/evil2b")
    assert not list(tmp_path.rglob("evil*"))
