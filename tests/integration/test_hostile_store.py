"""A store written by someone else must not make `download` write outside its destination.

Rows are planted with sqlite3 directly, bypassing every check artifactfs makes when tracking.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import pytest

import artifactfs
from artifactfs.store import default_store_path
from tests.conftest import make_tree

PAYLOAD = b"attacker-controlled bytes\n"


@pytest.fixture
def victim(tmp_path: Path) -> dict[str, Path]:
    """Run P-1 with a legitimate field, and a real local file whose bytes a planted entry names."""
    data = make_tree(tmp_path / "data", {"a.csv": b"a\n", "sub/c.csv": b"c\n"})
    payload = make_tree(tmp_path / "payload", {"evil.bin": PAYLOAD}) / "evil.bin"
    run = artifactfs.init_run(project="p")
    run["data"].track_files(str(data))
    assert run.id == "P-1"
    (tmp_path / "out").mkdir()  # DEST's parent: "../escape" from DEST would land in it
    return {"data": data, "payload": payload, "dest": tmp_path / "out" / "dest"}


def plant(field: str, paths: list[str], source: Path, run_id: str = "P-1") -> str:
    """Insert an artifact of entries at `paths`, all reading `source`; aim `field` at it."""
    body = source.read_bytes()
    artifact = hashlib.sha256(("hostile\n" + "\n".join(paths)).encode("utf-8", "replace"))
    artifact_hash = artifact.hexdigest()
    metadata = json.dumps({"file_path": f"file://{source}", "last_modified": "2024-01-01 00:00:00"})
    conn = sqlite3.connect(default_store_path())
    try:
        with conn:
            conn.execute(
                "INSERT INTO artifacts (id, hash, file_count, total_size, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    artifact_hash,
                    artifact_hash,
                    len(paths),
                    len(body) * len(paths),
                    "2024-01-01 00:00:00",
                ),
            )
            for path in paths:
                parent, _, name = path.rpartition("/")
                conn.execute(
                    "INSERT INTO artifact_entries (artifact_id, file_path, parent, name,"
                    " file_hash, type, size, metadata_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        artifact_hash,
                        path,
                        parent,
                        name,
                        hashlib.sha1(body).hexdigest(),
                        "Local",
                        len(body),
                        metadata,
                    ),
                )
            (run_pk,) = conn.execute("SELECT id FROM runs WHERE run_key = ?", (run_id,)).fetchone()
            updated = conn.execute(
                "UPDATE fields SET artifact_id = ? WHERE run_id = ? AND path = ?",
                (artifact_hash, run_pk, field),
            ).rowcount
            if not updated:
                conn.execute(
                    "INSERT INTO fields (run_id, path, artifact_id, updated_at)"
                    " VALUES (?, ?, ?, ?)",
                    (run_pk, field, artifact_hash, "2024-01-01 00:00:00"),
                )
    finally:
        conn.close()
    return artifact_hash


def snapshot(root: Path, *excluded: Path) -> dict[str, bytes | str]:
    """Every file, directory and symlink below root (outside `excluded`), with file contents."""
    seen: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in excluded]
        for name in dirnames:
            p = here / name
            seen[str(p)] = "link:" + os.readlink(p) if p.is_symlink() else "dir"
        for name in filenames:
            p = here / name
            seen[str(p)] = "link:" + os.readlink(p) if p.is_symlink() else p.read_bytes()
    return seen


def files_named(root: Path, name: str, outside: Path) -> list[Path]:
    return [
        p for p in root.rglob(name) if outside != p and outside not in p.parents and p.name == name
    ]


ESCAPES = [
    ["../escape"],
    ["/abs/evil"],
    ["a.csv", "../escape", "/abs/evil", "z.csv"],
    ["a/../../escape"],
    ["../../../../../../../../tmp/escape"],
    ["ok/../../escape"],
    ["./escape"],
    ["a//escape"],
    ["a/escape\x00/../../escape"],
    ["x" * 256 + "/escape"],
    [""],
]


@pytest.mark.parametrize("paths", ESCAPES, ids=[repr(p)[:40] for p in ESCAPES])
def test_download_refuses_paths_that_escape(
    cli, tmp_path: Path, victim: dict[str, Path], paths: list[str]
) -> None:
    plant("data", paths, victim["payload"])
    dest = victim["dest"]
    home = tmp_path / "home"
    before = snapshot(tmp_path, home, dest)
    assert not os.path.lexists("/abs/evil")
    assert not os.path.lexists("/tmp/escape")

    result = cli("download", "P-1", "data", str(dest))

    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    bad = [p for p in paths if p not in ("a.csv", "z.csv")]
    assert any(p in lines[0] or repr(p)[1:-1] in lines[0] for p in bad), lines[0]

    assert snapshot(tmp_path, home, dest) == before
    assert files_named(tmp_path, "escape", outside=dest) == []
    assert not os.path.lexists("/abs/evil")
    assert not os.path.lexists("/abs")
    assert not os.path.lexists("/tmp/escape")
    if dest.exists():
        for p in dest.rglob("*"):
            assert not p.is_file() or p.read_bytes() != PAYLOAD


@pytest.mark.parametrize("paths", [["../escape"], ["/abs/evil"], ["a", "../escape"]])
def test_api_download_refuses_paths_that_escape(
    tmp_path: Path, victim: dict[str, Path], paths: list[str]
) -> None:
    plant("planted", paths, victim["payload"])
    dest = victim["dest"]
    run = artifactfs.init_run(with_id="P-1", mode="read-only")
    with pytest.raises(artifactfs.ArtifactfsError):
        run["planted"].download(destination=str(dest))
    assert files_named(tmp_path, "escape", outside=dest) == []
    assert not os.path.lexists("/abs/evil")


def test_download_refuses_a_path_that_is_both_file_and_directory(
    cli, tmp_path: Path, victim: dict[str, Path]
) -> None:
    plant("data", ["x", "x/y"], victim["payload"])
    dest = victim["dest"]
    home = tmp_path / "home"
    before = snapshot(tmp_path, home, dest)
    result = cli("download", "P-1", "data", str(dest))
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert snapshot(tmp_path, home, dest) == before


def test_download_does_not_follow_symlinks_planted_in_the_destination(
    cli, tmp_path: Path, victim: dict[str, Path]
) -> None:
    outside = make_tree(tmp_path / "outside", {"victim.txt": b"keep me\n"})
    dest = victim["dest"]
    dest.mkdir(parents=True)
    os.symlink(outside, dest / "sub")  # the entry "sub/c.csv" would land in `outside`
    os.symlink(outside / "victim.txt", dest / "a.csv")  # the entry "a.csv" must replace the link
    home = tmp_path / "home"
    before = snapshot(tmp_path, home, dest)

    result = cli("download", "P-1", "data", str(dest))

    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "sub" in result.stderr
    assert snapshot(tmp_path, home, dest) == before
    assert (outside / "victim.txt").read_bytes() == b"keep me\n"
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    if not (dest / "a.csv").is_symlink():
        assert (dest / "a.csv").read_bytes() == b"a\n"


def test_files_listing_of_a_hostile_store_does_not_crash(cli, victim: dict[str, Path]) -> None:
    plant("data", ["../escape", "/abs/evil"], victim["payload"])
    result = cli("files", "P-1", "data", "--json")
    assert "Traceback" not in result.stderr
    assert result.returncode in (0, 2), result


def test_a_store_of_a_pre_release_layout_is_refused_in_one_line_and_left_as_it_was(
    cli, tmp_path: Path
) -> None:
    """A store that claims the current schema version but lacks its columns (written by a
    development build) gets one clear line, exit 2, and no change, from every command."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE artifactfs_meta (key VARCHAR(64) PRIMARY KEY, value TEXT)")
    conn.execute("INSERT INTO artifactfs_meta VALUES ('schema_version', '1')")
    conn.execute(
        "CREATE TABLE artifacts (hash VARCHAR(64) PRIMARY KEY, file_count INTEGER,"
        " total_size BIGINT, created_at VARCHAR(32))"
    )
    conn.commit()
    conn.close()
    data = make_tree(tmp_path / "data", {"a.csv": b"a"})
    for args in (("runs",), ("--project", "p", "track", "f", str(data))):
        result = cli("--store", str(path), *args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "no column artifacts.id" in lines[0], result.stderr
        assert "pre-release" in lines[0]
    check = sqlite3.connect(path)
    tables = check.execute("SELECT name FROM sqlite_master WHERE type='table'")
    assert sorted(row[0] for row in tables) == ["artifactfs_meta", "artifacts"]
    assert check.execute("SELECT * FROM artifactfs_meta").fetchall() == [("schema_version", "1")]
    assert check.execute("SELECT count(*) FROM artifacts").fetchone() == (0,)
    check.close()
