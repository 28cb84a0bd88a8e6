"""Tracking local files through the Python API and the CLI, and reading them back."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

import artifactfs
from artifactfs.cache import ChunkCache
from artifactfs.reader import Reader, ReadError
from artifactfs.store import Store, default_store_path
from tests.conftest import make_tree

# Every test here runs against SQLite and against PostgreSQL, but those marked
# backend_independent (SQLite only: the backend plays no part in what they check).
pytestmark = pytest.mark.store_backends

FILES = {
    "train/a.csv": b"x,y\n1,2\n3,4\n",
    "train/b.csv": b"x,y\n5,6\n",
    "test/c.csv": b"x,y\n7,8\n",
    "données/é.csv": "é;ü\n".encode(),
    "日本.txt": "日本語\n".encode(),
    "with space/name with space.txt": b"space\n",
    "empty.bin": b"",
    "blob.bin": os.urandom(3 * 1024 * 1024 + 17),  # more than one read chunk
}
KNOWN_MTIME = 1664535040  # 2022-09-30 10:50:40 UTC
LAST_MODIFIED_RE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


@pytest.fixture
def datasets(tmp_path: Path) -> Path:
    root = make_tree(tmp_path / "datasets", FILES)
    for rel in FILES:
        os.utime(root / rel, (KNOWN_MTIME, KNOWN_MTIME))
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() or p.is_symlink()
    }


# -- the Python API ---------------------------------------------------------------------------


def test_api_round_trip(datasets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = artifactfs.init_run(project="ml-team/classification", api_token="ignored")
    run["data_versions"].track_files("datasets/")
    assert run["sys/id"].fetch() == "CLS-1"
    tracked_hash = run["data_versions"].fetch_hash()
    run.stop()

    run = artifactfs.init_run(with_id="CLS-1", mode="read-only")
    assert run["sys/id"].fetch() == "CLS-1"
    assert run["data_versions"].fetch_hash() == tracked_hash
    assert run["data_versions"].fetch() == tracked_hash
    files = run["data_versions"].fetch_files_list()
    assert sorted(f.file_path for f in files) == sorted(FILES)
    local_times = {
        datetime.fromtimestamp(KNOWN_MTIME, timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        datetime.fromtimestamp(KNOWN_MTIME).strftime("%Y-%m-%d %H:%M:%S"),
    }
    for f in files:
        body = FILES[f.file_path]
        assert f.file_hash == sha1(body)
        assert f.size == len(body)
        assert f.type == "Local"
        assert f.metadata["file_path"] == "file://" + os.path.abspath(datasets / f.file_path)
        assert LAST_MODIFIED_RE.match(f.metadata["last_modified"])
        assert f.metadata["last_modified"] in local_times

    run["data_versions"].download(destination="downloaded_artifact")
    assert read_tree(tmp_path / "downloaded_artifact") == FILES
    # Downloading again over an existing copy is fine and leaves the same bytes.
    run["data_versions"].download(destination=str(tmp_path / "downloaded_artifact"))
    assert read_tree(tmp_path / "downloaded_artifact") == FILES
    run.stop()


def test_second_run_gets_the_next_number(datasets: Path) -> None:
    first = artifactfs.init_run(project="ml-team/classification")
    second = artifactfs.init_run(project="ml-team/classification")
    assert (first["sys/id"].fetch(), second["sys/id"].fetch()) == ("CLS-1", "CLS-2")


def test_file_url_is_accepted(datasets: Path) -> None:
    by_path = artifactfs.init_run(project="p")
    by_path["f"].track_files(str(datasets))
    by_url = artifactfs.init_run(project="p")
    by_url["f"].track_files("file://" + str(datasets))
    assert by_url["f"].fetch_hash() == by_path["f"].fetch_hash()
    single = artifactfs.init_run(project="p")
    single["f"].track_files("file://" + str(datasets / "train" / "a.csv"))
    assert [f.file_path for f in single["f"].fetch_files_list()] == ["a.csv"]


def test_destination_prefixes_every_path(datasets: Path) -> None:
    run = artifactfs.init_run(project="p")
    run["f"].track_files(str(datasets / "train"), destination="x/y")
    assert sorted(f.file_path for f in run["f"].fetch_files_list()) == ["x/y/a.csv", "x/y/b.csv"]


def test_single_file_is_named_by_its_base_name(datasets: Path) -> None:
    run = artifactfs.init_run(project="p")
    run["f"].track_files(str(datasets / "données" / "é.csv"))
    run["g"].track_files(str(datasets / "train" / "b.csv"), destination="x/y")
    [entry] = run["f"].fetch_files_list()
    assert (entry.file_path, entry.file_hash, entry.size) == (
        "é.csv",
        sha1(FILES["données/é.csv"]),
        len(FILES["données/é.csv"]),
    )
    assert [f.file_path for f in run["g"].fetch_files_list()] == ["x/y/b.csv"]


def test_project_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEPTUNE_PROJECT", "neptune-ws/vision")
    run = artifactfs.init_run()
    assert run["sys/project"].fetch() == "neptune-ws/vision"
    monkeypatch.setenv("ARTIFACTFS_PROJECT", "team/classification")
    run = artifactfs.init_run()  # ARTIFACTFS_PROJECT wins over NEPTUNE_PROJECT
    assert run["sys/project"].fetch() == "team/classification"
    assert run["sys/id"].fetch() == "CLS-1"
    monkeypatch.delenv("NEPTUNE_PROJECT")
    assert artifactfs.init_run()["sys/id"].fetch() == "CLS-2"


def test_cli_project_from_environment(cli, datasets: Path, monkeypatch) -> None:
    monkeypatch.setenv("ARTIFACTFS_PROJECT", "team/classification")
    result = cli("track", "data", str(datasets))
    assert result.returncode == 0, result.stderr
    assert result.last_line == "CLS-1"


def test_store_from_environment(datasets: Path, tmp_path: Path, monkeypatch) -> None:
    other = tmp_path / "elsewhere" / "other.db"
    monkeypatch.setenv("ARTIFACTFS_STORE", str(other))
    run = artifactfs.init_run(project="p")
    run["f"].track_files(str(datasets))
    assert other.exists()
    assert Store(str(other)).get_run(run.id).fields == ("f",)
    assert not default_store_path().exists()


def test_context_manager(datasets: Path) -> None:
    with artifactfs.init_run(project="ml-team/classification") as run:
        run["data"].track_files(str(datasets))
        run_id = run["sys/id"].fetch()
    reopened = artifactfs.init_run(with_id=run_id, mode="read-only")
    assert len(reopened["data"].fetch_files_list()) == len(FILES)


def test_tracking_on_a_read_only_run_raises(datasets: Path) -> None:
    run = artifactfs.init_run(project="p")
    run["f"].track_files(str(datasets / "train"))
    before = Store().counts()
    read_only = artifactfs.init_run(with_id=run.id, mode="read-only")
    with pytest.raises(artifactfs.ArtifactfsError):
        read_only["f"].track_files(str(datasets))
    with pytest.raises(artifactfs.ArtifactfsError):
        read_only["new_field"].track_files(str(datasets))
    assert Store().counts() == before
    assert len(read_only["f"].fetch_files_list()) == 2


# -- the local hash cache ---------------------------------------------------------------------


def test_unchanged_tree_is_not_read_again(datasets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = artifactfs.init_run(project="p")
    first["f"].track_files(str(datasets))

    def must_not_read(path: str, *args: object) -> str:
        raise AssertionError(f"re-read unchanged file {path}")

    monkeypatch.setattr("artifactfs.sources.local.sha1_of_file", must_not_read)
    second = artifactfs.init_run(project="p")
    second["f"].track_files(str(datasets))
    assert second["f"].fetch_hash() == first["f"].fetch_hash()
    # The same for a sub-directory of the tree tracked before.
    third = artifactfs.init_run(project="p")
    third["f"].track_files(str(datasets / "train"), destination="train")
    assert {f.file_path for f in third["f"].fetch_files_list()} == {"train/a.csv", "train/b.csv"}


def test_changed_file_with_same_size_is_hashed_again(
    datasets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = artifactfs.init_run(project="p")
    first["f"].track_files(str(datasets))
    changed = datasets / "train" / "a.csv"
    new_body = b"x,y\n9,9\n9,9\n"
    assert len(new_body) == len(FILES["train/a.csv"])
    changed.write_bytes(new_body)
    os.utime(changed, (KNOWN_MTIME + 60, KNOWN_MTIME + 60))

    from artifactfs.sources import local

    real = local.sha1_of_file
    read: list[str] = []

    def recording(path: str, *args: Any) -> str:
        read.append(path)
        return real(path, *args)

    monkeypatch.setattr("artifactfs.sources.local.sha1_of_file", recording)
    second = artifactfs.init_run(project="p")
    second["f"].track_files(str(datasets))
    assert read == [str(changed)]
    entries = {f.file_path: f for f in second["f"].fetch_files_list()}
    assert entries["train/a.csv"].file_hash == sha1(new_body)
    assert second["f"].fetch_hash() != first["f"].fetch_hash()


def test_retracking_an_unchanged_tree_into_its_field_builds_and_writes_nothing(
    datasets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a training script does on every start: track the same data into the same field."""
    run = artifactfs.init_run(project="p")
    run["f"].track_files(str(datasets))
    before_hash, before_rows = run["f"].fetch_hash(), run.store.counts()

    def must_not_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("entries built for an unchanged tree already in the field")

    with monkeypatch.context() as patched:
        patched.setattr("artifactfs.sources.local.LocalSource.entries_of", must_not_build)
        patched.setattr("artifactfs.sources.local.sha1_of_file", must_not_build)
        run["f"].track_files(str(datasets))
        run["f"].track_files(f"file://{datasets}/")
    assert run["f"].fetch_hash() == before_hash
    assert run.store.counts() == before_rows


@pytest.mark.parametrize(
    "change",
    ["same-size-content-mtime-restored", "file-added", "file-removed", "other-destination"],
)
def test_retracking_a_changed_tree_records_the_change(datasets: Path, change: str) -> None:
    run = artifactfs.init_run(project="p")
    run["f"].track_files(str(datasets))
    first = {e.file_path: e for e in run["f"].fetch_files_list()}
    destination = None
    expected = {path: sha1(body) for path, body in FILES.items()}
    if change == "same-size-content-mtime-restored":
        # `cp -p` / `rsync -t` style: new bytes of the same size under the old mtime.
        changed = datasets / "train" / "a.csv"
        new_body = b"x,y\n9,9\n9,9\n"
        assert len(new_body) == len(FILES["train/a.csv"])
        changed.write_bytes(new_body)
        os.utime(changed, (KNOWN_MTIME, KNOWN_MTIME))
        expected["train/a.csv"] = sha1(new_body)
    elif change == "file-added":
        (datasets / "train" / "new.csv").write_bytes(b"new\n")
        expected["train/new.csv"] = sha1(b"new\n")
    elif change == "file-removed":
        (datasets / "test" / "c.csv").unlink()  # the field keeps it: track_files only adds
    else:
        destination = "moved"
        expected.update({f"moved/{path}": digest for path, digest in list(expected.items())})
    run["f"].track_files(str(datasets), destination=destination)
    now = {e.file_path: e.file_hash for e in run["f"].fetch_files_list()}
    assert now == expected
    if change != "file-removed":
        assert run["f"].fetch_hash() != artifactfs.artifact_hash(first.values())


def test_retracking_one_of_two_trees_of_a_field_keeps_both(tmp_path: Path) -> None:
    one = make_tree(tmp_path / "one", {"a.csv": b"a"})
    two = make_tree(tmp_path / "two", {"b.csv": b"b"})
    run = artifactfs.init_run(project="p")
    run["f"].track_files(str(one))
    run["f"].track_files(str(two))
    both = run["f"].fetch_hash()
    run["f"].track_files(str(one))
    assert run["f"].fetch_hash() == both
    assert {e.file_path for e in run["f"].fetch_files_list()} == {"a.csv", "b.csv"}
    # The same tree into another run's new field is recorded there, not skipped.
    other = artifactfs.init_run(project="p")
    other["g"].track_files(str(one))
    assert [e.file_path for e in other["g"].fetch_files_list()] == ["a.csv"]


# -- the CLI ----------------------------------------------------------------------------------


def track(cli, *args: str) -> str:
    result = cli("--project", "ml-team/classification", "track", *args)
    assert result.returncode == 0, result.stderr
    return result.last_line


@pytest.mark.backend_independent
def test_cli_download_reproduces_every_byte(cli, datasets: Path, tmp_path: Path) -> None:
    run_id = track(cli, "data", str(datasets))
    assert run_id == "CLS-1"
    hashed = cli("hash", run_id, "data")
    assert hashed.returncode == 0, hashed.stderr
    api_hash = artifactfs.init_run(with_id=run_id, mode="read-only")["data"].fetch_hash()
    assert hashed.last_line == api_hash
    result = cli("download", run_id, "data", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert read_tree(tmp_path / "out") == FILES
    verified = cli("verify", run_id)
    assert verified.returncode == 0, verified.stderr
    assert verified.last_line == f"OK: {len(FILES)} file(s) in CLS-1 match what was tracked"


@pytest.mark.backend_independent
def test_cli_verify_of_a_run_with_no_fields_says_there_is_nothing_to_check(cli) -> None:
    run = artifactfs.init_run(project="ml-team/classification")
    run.stop()
    verified = cli("verify", run.id)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout == f"OK: {run.id} has no tracked files: nothing to check\n"
    assert cli("verify", run.id, "data").returncode == 2  # a field it does not have


@pytest.mark.backend_independent
def test_cli_download_and_verify_fail_when_a_source_changed(
    cli, datasets: Path, tmp_path: Path
) -> None:
    run_id = track(cli, "data", str(datasets))
    (datasets / "train" / "b.csv").write_bytes(b"x,y\n0,0\n")  # same size, new bytes
    os.utime(datasets / "train" / "b.csv", (KNOWN_MTIME + 5, KNOWN_MTIME + 5))

    downloaded = cli("download", run_id, "data", str(tmp_path / "out"))
    assert downloaded.returncode == 1, downloaded
    assert "train/b.csv" in downloaded.stderr
    assert len(downloaded.stderr.strip().splitlines()) == 1, downloaded.stderr
    assert "Traceback" not in downloaded.stderr
    assert not (tmp_path / "out" / "train" / "b.csv").exists()

    verified = cli("verify", run_id, "data")
    assert verified.returncode == 1, verified
    assert "train/b.csv" in verified.stdout + verified.stderr
    assert "Traceback" not in verified.stderr
    assert len(verified.stderr.strip().splitlines()) == 1, verified.stderr
    unchanged = [line for line in verified.stdout.splitlines() if "a.csv" in line]
    assert unchanged == []

    (datasets / "test" / "c.csv").unlink()  # a deleted source fails the check too
    verified = cli("verify", run_id)
    assert verified.returncode == 1
    assert "test/c.csv" in verified.stdout + verified.stderr


# Appends 4 KiB to the file named by its argument every millisecond, for good.
APPENDER = """
import sys, time
with open(sys.argv[1], "ab", buffering=0) as log:
    while True:
        log.write(b"x" * 4096)
        time.sleep(0.001)
"""


@pytest.mark.backend_independent
def test_a_file_written_to_while_tracked_refuses_the_track(cli, tmp_path: Path) -> None:
    """A file appended to while `track` read it got an entry of its listed size and the hash
    of more bytes than that: one that no download, read or verify could ever accept."""
    data = make_tree(tmp_path / "data", {"train.csv": b"a,b\n1,2\n"})
    growing = data / "run.log"
    growing.write_bytes(b"x" * (32 << 20))
    writer = subprocess.Popen([sys.executable, "-c", APPENDER, str(growing)])
    try:
        deadline = time.monotonic() + 30
        while growing.stat().st_size == 32 << 20:  # the writer is under way
            assert time.monotonic() < deadline, "the writer never wrote"
            time.sleep(0.01)
        refused = cli("--project", "ml/grow", "track", "data", str(data))
        assert refused.returncode == 2, refused
        assert refused.stderr == (
            f"artifactfs: error: {growing} changed while it was being tracked: "
            "track it again once nothing writes to it\n"
        ), refused.stderr
        assert "ml/grow" not in cli("runs").stdout  # nothing recorded
    finally:
        writer.kill()
        writer.wait()
    tracked = cli("--project", "ml/grow", "track", "data", str(data))  # still now: tracked
    assert tracked.returncode == 0, tracked
    entry = {
        e.file_path: e for e in artifactfs.init_run(tracked.last_line)["data"].fetch_files_list()
    }
    body = growing.read_bytes()
    assert (entry["run.log"].size, entry["run.log"].file_hash) == (
        len(body),
        hashlib.sha1(body).hexdigest(),
    )


@pytest.mark.backend_independent
def test_a_file_linked_to_while_verified_is_unchecked_not_changed(cli, tmp_path: Path) -> None:
    """A hard link made while `verify` hashed a file moves its ctime, not its bytes: it was
    said CHANGED. Not checked, it is UNCHECKED (exit 1 either way)."""
    data = tmp_path / "data"
    data.mkdir()
    shard = data / "shard.bin"
    with open(shard, "wb") as out:
        out.truncate(256 << 20)  # sparse: hashed in a second or two
    run_id = track(cli, "data", str(data))
    stop = threading.Event()

    def link_and_unlink() -> None:
        while not stop.is_set():
            os.link(shard, tmp_path / "backup.bin")
            os.unlink(tmp_path / "backup.bin")
            time.sleep(0.01)

    linker = threading.Thread(target=link_and_unlink)
    linker.start()
    try:
        verified = cli("verify", run_id)
    finally:
        stop.set()
        linker.join()
    assert verified.returncode == 1, verified
    assert verified.stdout.splitlines()[0] == (
        f"UNCHECKED data/shard.bin: file://{shard}: changed while it was being checked; "
        "check again once nothing writes to it"
    ), verified.stdout


@pytest.mark.backend_independent
def test_a_tracked_file_replaced_by_a_pipe_or_a_directory_is_said_so_and_never_waited_on(
    cli, tmp_path: Path
) -> None:
    """A named pipe where a tracked file was: its open waited for a writer forever (verify,
    download and the mount's reads hung); a directory was reported as "size is 4096"."""
    data = make_tree(tmp_path / "d", {"pipe.bin": b"four", "empty.bin": b"", "dir.txt": b"d"})
    run_id = track(cli, "data", str(data))
    for name in ("pipe.bin", "empty.bin"):
        (data / name).unlink()
        os.mkfifo(data / name)
    (data / "dir.txt").unlink()
    (data / "dir.txt").mkdir()

    verified = cli("verify", run_id)  # run_cli's 300 s timeout would end a hang
    assert verified.returncode == 1, verified
    lines = verified.stdout.splitlines()
    for name, now in (("pipe.bin", "a named pipe"), ("empty.bin", "a named pipe")):
        assert f"CHANGED data/{name}: file://{data}/{name}: is now {now}" in lines, lines
    assert f"CHANGED data/dir.txt: file://{data}/dir.txt: is now a directory" in lines, lines

    downloaded = cli("download", run_id, "data", str(tmp_path / "out"))
    assert downloaded.returncode == 1, downloaded
    assert "is now a named pipe" in downloaded.stderr

    reader = Reader(ChunkCache(tmp_path / "cache", 1 << 26))
    entries = {e.file_path: e for e in artifactfs.init_run(run_id)["data"].fetch_files_list()}
    try:
        with pytest.raises(ReadError, match="is now a named pipe"):
            reader.read(entries["pipe.bin"], 0, 4)  # the mount's read of a local file
    finally:
        reader.close()
        reader.cache.close()


@pytest.mark.backend_independent
def test_a_download_that_writes_nothing_leaves_the_destination_as_it_was(
    cli, datasets: Path, tmp_path: Path
) -> None:
    run_id = track(cli, "data", str(datasets))
    for name in FILES:
        (datasets / name).unlink()  # every source gone: every file fails
    fresh = tmp_path / "out" / "deep"
    failed = cli("download", run_id, "data", str(fresh))
    assert failed.returncode == 1, failed
    assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    assert "no longer exists" in failed.stderr
    assert not (tmp_path / "out").exists()  # no empty directories made for nothing

    kept = make_tree(tmp_path / "kept", {"mine.txt": b"mine", "train/old.csv": b"old"})
    before = read_tree(kept)
    failed = cli("download", run_id, "data", str(kept))
    assert failed.returncode == 1, failed
    assert read_tree(kept) == before
    assert sorted(p.name for p in (kept).iterdir()) == ["mine.txt", "train"]
    assert sorted(p.name for p in (kept / "train").iterdir()) == ["old.csv"]


@pytest.mark.backend_independent
def test_download_into_a_destination_that_cannot_be_made_is_one_line(
    cli, datasets: Path, tmp_path: Path
) -> None:
    run_id = track(cli, "data", str(datasets))
    (tmp_path / "a-file").write_bytes(b"x")
    for destination, reason in (
        (tmp_path / "a-file" / "out", "is not a directory"),
        (Path("/proc/artifactfs-no-such/out"), "cannot create directory"),
    ):
        result = cli("download", run_id, "data", str(destination))
        assert result.returncode == 2, result
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
        assert reason in result.stderr, result.stderr
    assert (tmp_path / "a-file").read_bytes() == b"x"


@pytest.mark.backend_independent
def test_a_directory_where_a_file_goes_is_named_whole(cli, datasets: Path, tmp_path: Path) -> None:
    """It was said as `train/a.csv: Is a directory`, naming neither DEST nor the directory."""
    run_id = track(cli, "data", str(datasets))
    dest = tmp_path / "out"
    (dest / "train" / "a.csv").mkdir(parents=True)
    result = cli("download", run_id, "data", str(dest))
    assert result.returncode == 1, result
    assert result.stderr == (
        "artifactfs: error: download failed for 1 file(s): "
        f"train/a.csv: {dest}/train/a.csv exists and is a directory\n"
    ), result.stderr
    assert (dest / "train" / "b.csv").read_bytes() == FILES["train/b.csv"]  # the rest written


@pytest.mark.backend_independent
def test_a_download_destination_may_start_with_a_tilde_as_a_tracked_path_may(
    datasets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`download(destination="~/data")` made a directory named `~` in the current one."""
    home, here = tmp_path / "home", tmp_path / "here"
    here.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    run = artifactfs.init_run(project="p")
    run["data"].track_files(str(datasets))
    run["data"].download(destination="~/data")
    assert read_tree(home / "data") == read_tree(datasets)
    assert list(here.iterdir()) == []


def test_no_command_prints_the_help_as_it_is(cli) -> None:
    """It came as one "error" line holding the whole help, every line run together."""
    for args in ((), ("cache",)):
        result = cli(*args)
        assert result.returncode == 2, result
        lines = result.stderr.splitlines()
        assert lines[0].startswith("Usage: artifactfs"), result.stderr
        assert "Commands:" in lines and len(lines) > 8, result.stderr
        assert "error" not in result.stderr


def test_runs_before_anything_was_tracked_lists_none_and_makes_no_store(cli) -> None:
    """The default store, on a machine that tracked nothing yet: no runs (a store named by
    --store that is not there is a typo, and is said: test_store_errors)."""
    result = cli("runs")
    assert result.returncode == 0, result
    assert result.stdout.split() == ["ID", "PROJECT", "CREATED", "(UTC)", "FIELDS"]
    assert not default_store_path().exists()
    assert not default_store_path().parent.exists()


@pytest.mark.backend_independent
def test_an_empty_download_destination_is_refused(cli, datasets: Path, tmp_path: Path) -> None:
    """`download RUN FIELD "$OUT"` with OUT unset wrote into the current directory."""
    run_id = track(cli, "data", str(datasets))
    here = tmp_path / "here"
    here.mkdir()
    for empty in ("", "  "):
        result = cli("download", run_id, "data", empty, cwd=here)
        assert result.returncode == 2, result
        assert result.stderr.strip() == (
            "artifactfs: error: DEST is empty: name the directory to write into ('.' for this one)"
        )
    assert list(here.iterdir()) == []
    assert cli("download", run_id, "data", ".", cwd=here).returncode == 0
    assert read_tree(here) == FILES


@pytest.mark.backend_independent
def test_a_field_argument_may_end_with_a_slash_as_in_the_api(cli, datasets: Path) -> None:
    """A shell completes a directory-like field name with a slash; `run["data/"]` takes it."""
    run_id = track(cli, "data", str(datasets))
    expected = cli("hash", run_id, "data", check=True).last_line
    assert cli("hash", run_id, "data/", check=True).last_line == expected
    assert cli("files", run_id, "data//", check=True).stdout == cli("files", run_id, "data").stdout
    tracked = cli("track", "--run", run_id, "more/", str(datasets / "train"))
    assert tracked.returncode == 0, tracked.stderr
    assert artifactfs.init_run(run_id, mode="read-only").exists("more")
    assert cli("hash", run_id, "more", check=True).last_line
    for refused in ("/", "/data", ""):  # nothing left, or an absolute path: still refused
        for command in ("hash", "verify"):  # verify without FIELD checks them all; "" is none
            result = cli(command, run_id, refused)
            assert result.returncode == 2, result
    (datasets / "train" / "b.csv").write_bytes(b"changed since")
    verified = cli("verify", run_id, "data/")
    assert verified.returncode == 1, verified
    assert verified.stdout.startswith("CHANGED data/train/b.csv: "), verified.stdout  # not data//


@pytest.mark.backend_independent
def test_cli_diff(cli, tmp_path: Path) -> None:
    old = make_tree(
        tmp_path / "old", {"same.txt": b"same", "gone.txt": b"gone", "changed/x.csv": b"1"}
    )
    new = make_tree(
        tmp_path / "new", {"same.txt": b"same", "changed/x.csv": b"2", "added/é.txt": b"new"}
    )
    run_a = track(cli, "data", str(old))
    run_b = track(cli, "data", str(new))
    result = cli("diff", run_a, run_b, "data")
    assert result.returncode == 0, result.stderr
    lines = sorted(line.split() for line in result.stdout.strip().splitlines())
    assert lines == [["A", "added/é.txt"], ["D", "gone.txt"], ["M", "changed/x.csv"]]
    reverse = cli("diff", run_b, run_a, "data")
    lines = sorted(line.split() for line in reverse.stdout.strip().splitlines())
    assert lines == [["A", "gone.txt"], ["D", "added/é.txt"], ["M", "changed/x.csv"]]
    same = cli("diff", run_a, run_a, "data")
    assert same.returncode == 0
    assert same.stdout.strip() == ""


def test_a_warning_of_artifactfs_reaches_a_cli_user_as_one_line_and_the_command_goes_on(
    cli, datasets: Path
) -> None:
    """The command line showed no warning at all (its logging let only critical lines
    through): a hash cache that cannot be used, a version that cannot be pinned, a download
    through a temporary cache went unsaid."""
    hashes = Path(os.environ["XDG_CACHE_HOME"]) / "artifactfs" / "local-hashes.sqlite"
    hashes.parent.mkdir(parents=True, exist_ok=True)
    hashes.write_bytes(b"not an SQLite database, " * 20)
    result = cli("--project", "ml-team/classification", "track", "data", str(datasets))
    assert result.returncode == 0, result
    assert result.last_line == "CLS-1"
    assert result.stderr.splitlines() == [
        f"artifactfs: warning: local hash cache {hashes} unusable, hashing everything: "
        "file is not a database"
    ], result.stderr


@pytest.mark.backend_independent
def test_files_columns_line_up_as_a_terminal_shows_wide_and_combining_characters(
    cli, tmp_path: Path
) -> None:
    names = {"日本語/データ.json": b"12", "e\u0301te\u0301.txt": b"345", "plain.txt": b"6789"}
    run_id = track(cli, "data", str(make_tree(tmp_path / "wide", names)))
    listed = cli("files", run_id, "data", check=True)
    lines = listed.stdout.splitlines()
    # The SIZE column starts at the same terminal column on every line: the path's width
    # in columns (2 for each CJK character, 0 for a combining accent) plus its padding.
    starts = set()
    for line in lines:
        found = re.match(r"(.*?)( {2,})\S", line)
        assert found, line
        path, padding = found.groups()
        wide = sum("\u3000" <= c <= "\u9fff" for c in path)  # CJK and kana: two columns
        columns = len(path) + wide - path.count("\u0301")  # a combining accent: none
        starts.add(columns + len(padding))
    assert len(starts) == 1, listed.stdout


@pytest.mark.backend_independent
def test_names_with_newlines_and_quotes_are_one_quoted_line_each(cli, tmp_path: Path) -> None:
    """A newline in a file name would split `files`, `diff` and `verify` lines in two: such
    names (and any with a control character, a quote or a backslash) print as git prints them."""
    names = {
        "line\nbreak.txt": b"1",
        'say "hi".txt': b"2",
        "tab\tand\\.txt": b"3",
        "plain.txt": b"4",
        "nel\u0085and\u2028.txt": b"5",  # line ends for Python's splitlines, too
    }
    old = make_tree(tmp_path / "old", names)
    run_a = track(cli, "data", str(old))
    listed = cli("files", run_a, "data")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert len(lines) == 1 + len(names), lines
    paths = sorted(line.split("  ")[0].rstrip() for line in lines[1:])
    assert paths == [
        '"line\\nbreak.txt"',
        '"nel\\302\\205and\\342\\200\\250.txt"',
        '"say \\"hi\\".txt"',
        '"tab\\tand\\\\.txt"',
        "plain.txt",
    ]

    new = make_tree(tmp_path / "new", {**names, "line\nbreak.txt": b"changed"})
    run_b = track(cli, "data", str(new))
    changed = cli("diff", run_a, run_b, "data")
    assert changed.stdout.splitlines() == ['M\t"line\\nbreak.txt"'], changed.stdout

    (old / "line\nbreak.txt").write_bytes(b"x")  # same size, new bytes
    os.utime(old / "line\nbreak.txt", (KNOWN_MTIME, KNOWN_MTIME))
    verified = cli("verify", run_a, "data")
    assert verified.returncode == 1, verified
    [reported] = verified.stdout.splitlines()
    assert reported.startswith('CHANGED "data/line\\nbreak.txt": '), reported


def test_same_content_tracked_from_two_places_keeps_each_source(tmp_path: Path) -> None:
    """One artifact hash (content only), but each run reads from where it was tracked."""
    first = make_tree(tmp_path / "first", {"a.csv": b"same bytes"})
    second = make_tree(tmp_path / "second", {"a.csv": b"same bytes"})
    run_one = artifactfs.init_run(project="ml/dup")
    run_one["data"].track_files(str(first))
    run_two = artifactfs.init_run(project="ml/dup")
    run_two["data"].track_files(str(second))
    assert run_one["data"].fetch_hash() == run_two["data"].fetch_hash()
    [entry_one] = run_one["data"].fetch_files_list()
    [entry_two] = run_two["data"].fetch_files_list()
    assert entry_one.metadata["file_path"] == f"file://{first / 'a.csv'}"
    assert entry_two.metadata["file_path"] == f"file://{second / 'a.csv'}"
