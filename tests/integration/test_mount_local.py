"""Real FUSE mounts of local artifacts, checked the way a user checks them: cat, stat, ls -l,
sha1sum, getfattr, writes that must fail, signals to the daemon, errors of the mount command."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from artifactfs import __version__
from artifactfs.fs.daemon import is_mounted
from tests.conftest import make_tree
from tests.support.mounts import (
    artifactfs_mounts,
    force_unmount,
    mounted,
    pid_alive,
    wait_gone,
)

# Every test here runs against SQLite and against PostgreSQL, but those marked
# backend_independent (SQLite only: the backend plays no part in what they check).
pytestmark = pytest.mark.store_backends

FILE_XATTRS = (
    "file_hash",
    "type",
    "source",
    "last_modified",
    "size",
    "artifact_hash",
    "run",
    "field",
    "cached",
)
ARTIFACT_ROOT_XATTRS = ("artifact_hash", "file_count", "size")
MOUNT_ROOT_XATTRS = (
    "version",
    "cache_bytes",
    "cache_limit",
    "hits",
    "misses",
    "fetched_bytes",
    "errors",
)

# Names a user really has: spaces, accents, other scripts, nesting, an empty file.
VARIED_FILES: dict[str, bytes] = {
    "train/a.csv": b"a,b\n1,2\n3,4\n",
    "train/sub dir/deep er/x y.bin": os.urandom(200_000),
    "naïve/über файл.txt": "données, Grüße, данные\n".encode(),
    "日本語/データ 1.json": b'{"k": 1}\n',
    "empty.txt": b"",
    "big.bin": os.urandom(3 * 1024 * 1024 + 17),
    "top level.txt": b"top\n",
}


# -- helpers --------------------------------------------------------------------------------


def track(cli: Any, project: str, field: str, path: Path, *extra: str) -> str:
    """`artifactfs --project P track [extra] FIELD PATH`; the run id it prints."""
    return cli("--project", project, "track", *extra, field, str(path), check=True).last_line


def set_mtimes(root: Path, files: dict[str, bytes]) -> dict[str, int]:
    """Distinct past mtimes with a fractional part; returns whole seconds per file."""
    seconds = {}
    for index, rel in enumerate(sorted(files)):
        whole = 1_600_000_000 + index * 86_461
        os.utime(root / rel, ns=(whole * 10**9 + 987_654_321,) * 2)
        seconds[rel] = whole
    return seconds


def utc_text(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def sha1sum(path: Path) -> str:
    out = subprocess.run(["sha1sum", str(path)], capture_output=True, check=True).stdout
    return out.split()[0].decode()


def dirs_of(files: dict[str, bytes]) -> set[str]:
    """Every directory implied by the file paths, '' (the tree's root) included."""
    found = {""}
    for rel in files:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            found.add("/".join(parts[:i]))
    return found


def walk_files(base: Path) -> dict[str, Path]:
    """Relative path -> path of every file below base, as os.walk sees it."""
    found = {}
    for dirpath, _dirnames, filenames in os.walk(base):
        for name in filenames:
            full = Path(dirpath) / name
            found[full.relative_to(base).as_posix()] = full
    return found


def getfattr_names(path: Path) -> dict[str, str]:
    """Names and values that `getfattr -d -m - PATH` prints."""
    result = subprocess.run(
        ["getfattr", "-d", "-m", "-", "--absolute-names", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    values = {}
    for line in result.stdout.splitlines():
        if "=" in line and not line.startswith("#"):
            name, value = line.split("=", 1)
            values[name] = value.strip('"')
    return values


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def in_proc_mounts(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/mounts") as mounts:
        return any(
            line.split()[1].replace("\\040", " ") == target for line in mounts if line.strip()
        )


def assert_one_line_error(result: Any) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("artifactfs: error:"), lines[0]


def assert_not_mounted(path: Path) -> None:
    try:
        assert not is_mounted(str(path)), f"{path} was mounted"
        assert not in_proc_mounts(path)
        assert os.listdir(path) == []
    finally:
        if is_mounted(str(path)):
            force_unmount(path, None)


# -- 1. bytes, hashes, stat, ls -l ----------------------------------------------------------


def test_files_read_back_with_their_hashes_sizes_times_and_modes(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A non-UTC local time zone: st_mtime must still be the UTC instant that was tracked.
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    source = make_tree(tmp_path / "datasets", VARIED_FILES)
    mtimes = set_mtimes(source, VARIED_FILES)
    run_id = track(cli, "ml/cls", "data_versions", source)

    with mounted(tmp_path / "mnt") as mount:
        base = mount.path / "ml" / "cls" / run_id / "data_versions"
        rel_base = f"ml/cls/{run_id}/data_versions"

        assert set(walk_files(base)) == set(VARIED_FILES)
        for rel, body in VARIED_FILES.items():
            path = base / rel
            assert path.read_bytes() == body, rel
            assert mount.xattr(f"{rel_base}/{rel}", "file_hash") == sha1sum(source / rel), rel
            info = os.stat(path)
            assert stat.S_ISREG(info.st_mode), rel
            assert stat.S_IMODE(info.st_mode) == 0o444, (rel, oct(info.st_mode))
            assert info.st_size == len(body), rel
            assert int(info.st_mtime) == mtimes[rel] == int(os.stat(source / rel).st_mtime), rel
            assert mount.xattr(f"{rel_base}/{rel}", "last_modified") == utc_text(mtimes[rel])
            assert info.st_uid == os.getuid(), rel

        # Every directory on the way, from the mount root down: 0555, owned by the user.
        above = ["", "ml", "ml/cls", f"ml/cls/{run_id}"]
        inside = [f"{rel_base}/{d}".rstrip("/") for d in dirs_of(VARIED_FILES)]
        for rel in above + inside:
            info = os.stat(mount.path / rel if rel else mount.path)
            assert stat.S_ISDIR(info.st_mode), rel
            assert stat.S_IMODE(info.st_mode) == 0o555, (rel, oct(info.st_mode))
            assert info.st_uid == os.getuid(), rel

        # `ls -l` in each directory shows every file with its tracked size and mode.
        env = {**os.environ, "LC_ALL": "C.UTF-8"}
        for directory in dirs_of(VARIED_FILES):
            expected = {
                rel.rsplit("/", 1)[-1]: len(body)
                for rel, body in VARIED_FILES.items()
                if (rel.rsplit("/", 1)[0] if "/" in rel else "") == directory
            }
            listing = subprocess.run(
                ["ls", "-ln", "--time-style=+%s", "--quoting-style=literal", str(base / directory)],
                capture_output=True,
                text=True,
                env=env,
            )
            assert listing.returncode == 0, listing.stderr
            shown = {}
            for line in listing.stdout.splitlines():
                fields = line.split(None, 6)
                if len(fields) < 7 or not fields[0].startswith("-"):
                    continue
                mode, _links, uid, _gid, size, _when, name = fields
                assert mode.startswith("-r--r--r--"), line
                assert int(uid) == os.getuid(), line
                shown[name] = int(size)
            assert shown == expected, (directory, listing.stdout)


# -- 2. layouts -----------------------------------------------------------------------------


def test_whole_store_run_and_artifact_layouts(cli: Any, tmp_path: Path) -> None:
    versions = {"a.csv": b"1,2\n", "sub/b.txt": b"bee\n"}
    train = {"img/0.png": os.urandom(1000), "labels.txt": b"cat\ndog\n"}
    solo_files = {"only.txt": b"solo\n"}
    run_id = track(cli, "ml/cls", "data_versions", make_tree(tmp_path / "v", versions))
    track(cli, "ml/cls", "datasets/train", make_tree(tmp_path / "t", train), "--run", run_id)
    solo_run = track(cli, "solo", "data", make_tree(tmp_path / "s", solo_files))

    with mounted(tmp_path / "whole") as mount:
        assert sorted(os.listdir(mount.path)) == ["default", "ml"]
        assert os.listdir(mount.path / "ml") == ["cls"]
        assert os.listdir(mount.path / "ml" / "cls") == [run_id]
        run_dir = mount.path / "ml" / "cls" / run_id
        assert sorted(os.listdir(run_dir)) == ["data_versions", "datasets"]
        assert os.listdir(run_dir / "datasets") == ["train"]
        for rel, body in versions.items():
            assert (run_dir / "data_versions" / rel).read_bytes() == body
        for rel, body in train.items():
            assert (run_dir / "datasets" / "train" / rel).read_bytes() == body
        assert set(walk_files(run_dir / "datasets" / "train")) == set(train)
        assert os.listdir(mount.path / "default") == ["solo"]
        assert os.listdir(mount.path / "default" / "solo") == [solo_run]
        assert (mount.path / "default" / "solo" / solo_run / "data" / "only.txt").read_bytes() == (
            b"solo\n"
        )

    with mounted(tmp_path / "run", "--run", run_id) as mount:
        assert sorted(os.listdir(mount.path)) == ["data_versions", "datasets"]
        assert set(walk_files(mount.path / "data_versions")) == set(versions)
        for rel, body in versions.items():
            assert (mount.path / "data_versions" / rel).read_bytes() == body
        for rel, body in train.items():
            assert (mount.path / "datasets" / "train" / rel).read_bytes() == body

    with mounted(tmp_path / "art", "--run", run_id, "--field", "datasets/train") as mount:
        assert sorted(os.listdir(mount.path)) == ["img", "labels.txt"]
        assert set(walk_files(mount.path)) == set(train)
        for rel, body in train.items():
            assert (mount.path / rel).read_bytes() == body

    with mounted(tmp_path / "solo", "--run", solo_run, "--field", "data") as mount:
        assert os.listdir(mount.path) == ["only.txt"]
        assert (mount.path / "only.txt").read_bytes() == b"solo\n"


# -- 3. extended attributes -----------------------------------------------------------------


def test_extended_attributes_of_files_artifact_roots_and_the_mount_root(
    cli: Any, tmp_path: Path
) -> None:
    files = {"x/one.bin": os.urandom(5000), "two.txt": b"two\n", "empty": b""}
    source = make_tree(tmp_path / "train", files)
    mtimes = set_mtimes(source, files)
    run_id = track(cli, "ml/cls", "datasets/train", source)
    expected_hash = cli("hash", run_id, "datasets/train", check=True).last_line

    with mounted(tmp_path / "mnt") as mount:
        art = f"ml/cls/{run_id}/datasets/train"
        for rel, body in files.items():
            path = mount.path / art / rel
            names = {n.removeprefix("user.artifactfs.") for n in os.listxattr(path)}
            assert names == set(FILE_XATTRS), rel
            values = {name: mount.xattr(f"{art}/{rel}", name) for name in FILE_XATTRS}
            assert values["file_hash"] == hashlib.sha1(body).hexdigest()
            assert values["type"] == "Local"
            assert values["source"] == f"file://{source / rel}"
            assert values["last_modified"] == utc_text(mtimes[rel])
            assert values["size"] == str(len(body))
            assert values["artifact_hash"] == expected_hash
            assert values["run"] == run_id
            assert values["field"] == "datasets/train"
            assert values["cached"] == str(len(body))  # read in place: all of it is here
            shown = getfattr_names(path)
            assert {f"user.artifactfs.{n}" for n in FILE_XATTRS} <= set(shown), shown
            assert shown["user.artifactfs.file_hash"] == values["file_hash"]

        root_names = {n.removeprefix("user.artifactfs.") for n in os.listxattr(mount.path / art)}
        assert set(ARTIFACT_ROOT_XATTRS) <= root_names
        assert mount.xattr(art, "artifact_hash") == expected_hash
        assert mount.xattr(art, "file_count") == str(len(files))
        assert mount.xattr(art, "size") == str(sum(len(b) for b in files.values()))
        shown = getfattr_names(mount.path / art)
        assert {f"user.artifactfs.{n}" for n in ARTIFACT_ROOT_XATTRS} <= set(shown), shown

        assert mount.xattr("", "version") == __version__
        for name in MOUNT_ROOT_XATTRS[1:]:
            assert mount.root_figure(name) >= 0, name
        assert mount.root_figure("cache_limit") == 10 * 1024**3  # the default 10G
        shown = getfattr_names(mount.path)
        assert {f"user.artifactfs.{n}" for n in MOUNT_ROOT_XATTRS} <= set(shown), shown

        with pytest.raises(OSError) as missing:
            os.getxattr(mount.path / art / "two.txt", "user.artifactfs.no_such_name")
        assert missing.value.errno == errno.ENODATA

        (source / "x" / "one.bin").unlink()  # its bytes are nowhere now
        (source / "two.txt").write_bytes(b"two, and more\n")
        assert mount.xattr(f"{art}/x/one.bin", "cached") == "0"
        assert mount.xattr(f"{art}/two.txt", "cached") == "0"


def test_artifact_mounted_as_the_root_has_both_root_and_artifact_xattrs(
    cli: Any, tmp_path: Path
) -> None:
    files = {"a.txt": b"aaa\n", "b/c.txt": b"cc\n"}
    run_id = track(cli, "ml/cls", "data", make_tree(tmp_path / "d", files))
    expected_hash = cli("hash", run_id, "data", check=True).last_line
    with mounted(tmp_path / "mnt", "--run", run_id, "--field", "data", "--cache-size", "1G") as m:
        names = {n.removeprefix("user.artifactfs.") for n in os.listxattr(m.path)}
        assert set(ARTIFACT_ROOT_XATTRS) | set(MOUNT_ROOT_XATTRS) <= names, sorted(names)
        assert m.xattr("", "artifact_hash") == expected_hash
        assert m.xattr("", "file_count") == "2"
        assert m.xattr("", "size") == str(sum(len(b) for b in files.values()))
        assert m.xattr("", "version") == __version__
        assert m.root_figure("cache_limit") == 1024**3


# -- 4. stable inodes -----------------------------------------------------------------------


def _inodes(base: Path) -> dict[str, int]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            found[full.relative_to(base).as_posix()] = os.stat(full).st_ino
    return found


def _times_in_runs(base: Path) -> dict[str, int]:
    """st_mtime_ns of every directory and file below the runs (workspace/project/RUN/...)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            rel = (Path(dirpath) / name).relative_to(base).as_posix()
            if rel.count("/") >= 2:
                found[rel] = os.stat(base / rel).st_mtime_ns
    return found


@pytest.mark.backend_independent
def test_the_daemon_keeps_no_directory_busy_and_takes_relative_paths(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon kept the directory it was started from as its own, so that directory's
    file system could not be unmounted while the mount lived. It works from `/`, with the
    relative paths it was given made absolute where it was started."""
    source = make_tree(tmp_path / "src", {"a.txt": b"relative"})
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("ARTIFACTFS_STORE", "store.db")
    run_id = track(cli, "ml/cls", "data", source)
    with mounted(tmp_path / "mnt", "--cache-dir", "cache", "--log-file", "daemon.log") as mount:
        assert os.readlink(f"/proc/{mount.pid}/cwd") == "/"
        assert (mount.path / "ml" / "cls" / run_id / "data" / "a.txt").read_bytes() == b"relative"
        assert mount.log_file == work / "daemon.log"
    assert (work / "cache" / "data").is_dir() and (work / "store.db").is_file()


def test_inode_numbers_are_stable_across_mounts_and_distinct(cli: Any, tmp_path: Path) -> None:
    files = {"a.txt": b"a", "b.txt": b"b", "d/c.txt": b"c", "d/e/f.txt": b"f", "same.txt": b"a"}
    track(cli, "ml/cls", "data", make_tree(tmp_path / "src", files))
    track(cli, "ml/other", "data", make_tree(tmp_path / "src2", files))

    with mounted(tmp_path / "mnt") as mount:
        first = _inodes(mount.path)
        first_times = _times_in_runs(mount.path)
        # What `ls -i` shows (d_ino from readdir) is what stat shows.
        for dirpath, _dirs, _files in os.walk(mount.path):
            with os.scandir(dirpath) as entries:
                for entry in entries:
                    assert entry.inode() == entry.stat().st_ino, entry.path
    file_inodes = {rel: ino for rel, ino in first.items() if rel.endswith(".txt")}
    assert len(file_inodes) == 2 * len(files)
    assert len(set(file_inodes.values())) == len(file_inodes), "two files share an inode"
    assert len(set(first.values())) == len(first), "two nodes share an inode"

    # Two mounts at once: a cache directory serves one mount at a time.
    other_cache = ("--cache-dir", str(tmp_path / "other-cache"))
    with mounted(tmp_path / "mnt") as again, mounted(tmp_path / "other", *other_cache) as other:
        assert _inodes(again.path) == first
        assert _inodes(other.path) == first
        # Times too (directories had the mount's: `rsync`/`tar` saw them change each remount).
        assert len(first_times) == 2 * (4 + len(files))  # a run, its field, d, d/e, files
        assert _times_in_runs(again.path) == first_times
        assert _times_in_runs(other.path) == first_times


# -- 5. read-only ---------------------------------------------------------------------------


@pytest.mark.backend_independent
def test_every_write_fails_with_erofs(cli: Any, tmp_path: Path) -> None:
    files = {"a.txt": b"hello\n", "sub/b.txt": b"bee\n"}
    run_id = track(cli, "ml/cls", "data", make_tree(tmp_path / "src", files))

    with mounted(tmp_path / "mnt") as mount:
        art = mount.path / "ml" / "cls" / run_id / "data"
        target = art / "a.txt"

        def write_in_place() -> None:
            with open(target, "r+b") as handle:
                handle.write(b"X")

        def append() -> None:
            with open(target, "ab") as handle:
                handle.write(b"X")

        def create() -> None:
            with open(art / "new.txt", "wb") as handle:
                handle.write(b"new")

        attempts: dict[str, Callable[[], object]] = {
            "write": write_in_place,
            "append": append,
            "open O_WRONLY": lambda: os.open(target, os.O_WRONLY),
            "create": create,
            "create at the root": lambda: os.open(mount.path / "x", os.O_CREAT | os.O_WRONLY),
            "mkdir": lambda: os.mkdir(art / "newdir"),
            "mkdir at the root": lambda: os.mkdir(mount.path / "newdir"),
            "unlink": lambda: os.unlink(target),
            "rmdir": lambda: os.rmdir(art / "sub"),
            "rename": lambda: os.rename(target, art / "renamed.txt"),
            "rename a run": lambda: os.rename(art.parent, art.parent.parent / "X-1"),
            "chmod": lambda: os.chmod(target, 0o644),
            "chmod a directory": lambda: os.chmod(art, 0o755),
            "truncate": lambda: os.truncate(target, 0),
            "setxattr": lambda: os.setxattr(target, "user.artifactfs.file_hash", b"0" * 40),
            "setxattr new name": lambda: os.setxattr(target, "user.note", b"x"),
            "removexattr": lambda: os.removexattr(target, "user.artifactfs.file_hash"),
            "symlink": lambda: os.symlink("a.txt", art / "link"),
            "hard link": lambda: os.link(target, art / "hard"),
            "utime": lambda: os.utime(target, (0, 0)),
        }
        for what, attempt in attempts.items():
            with pytest.raises(OSError) as failure:
                attempt()
            assert failure.value.errno == errno.EROFS, (what, failure.value)

        assert target.read_bytes() == b"hello\n"
        assert sorted(os.listdir(art)) == ["a.txt", "sub"]
        assert mount.xattr(f"ml/cls/{run_id}/data/a.txt", "file_hash") == (
            hashlib.sha1(b"hello\n").hexdigest()
        )
    assert (tmp_path / "src" / "a.txt").read_bytes() == b"hello\n"


# -- 6. changed sources ---------------------------------------------------------------------


@pytest.mark.backend_independent
def test_a_file_read_again_and_again_as_it_fails_is_logged_once_a_window(
    cli: Any, tmp_path: Path
) -> None:
    """A program retrying a failing file wrote one EIO line a read to the daemon's log:
    ~4,000 a second, megabytes a minute. The same line is written once per 10 s now."""
    source = make_tree(tmp_path / "src", {"gone.bin": b"g" * 4096})
    run_id = track(cli, "ml/cls", "data", source)
    (source / "gone.bin").unlink()
    with mounted(tmp_path / "mnt") as mount:
        gone = mount.path / "ml" / "cls" / run_id / "data" / "gone.bin"
        began = time.monotonic()
        for _ in range(300):
            with pytest.raises(OSError) as failure:
                gone.read_bytes()
            assert failure.value.errno == errno.EIO
        windows = 1 + int((time.monotonic() - began) // 10)
        said = [line for line in mount.log().splitlines() if f"{source}/gone.bin" in line]
        assert 1 <= len(said) <= windows, said
    # Unmounted: the repeats held back since are told, with their count.
    said = [line for line in mount.log().splitlines() if f"{source}/gone.bin" in line]
    counts = [
        re.search(r"\(and (\d+) more times since it was last written\)$", line) for line in said
    ]
    assert counts[-1] is not None, said[-1]
    assert sum(1 + (int(found.group(1)) if found else 0) for found in counts) >= 300, said


@pytest.mark.backend_independent
def test_a_changed_local_file_fails_with_eio_and_is_logged(cli: Any, tmp_path: Path) -> None:
    files = {
        "same_size.bin": b"A" * 4096,
        "other_size.bin": b"B" * 4096,
        "read_before.bin": b"C" * 4096,
        "touched.bin": b"D" * 4096,
        "untouched.bin": b"E" * 4096,
        "deleted.bin": b"F" * 4096,
    }
    source = make_tree(tmp_path / "src", files)
    run_id = track(cli, "ml/cls", "data", source)

    def rewrite(name: str, body: bytes) -> None:
        path = source / name
        path.write_bytes(body)
        later = os.stat(path).st_mtime_ns + 10 * 10**9  # surely another mtime
        os.utime(path, ns=(later, later))

    with mounted(tmp_path / "mnt") as mount:
        art = mount.path / "ml" / "cls" / run_id / "data"
        assert (art / "read_before.bin").read_bytes() == files["read_before.bin"]

        rewrite("same_size.bin", b"Z" * 4096)
        rewrite("other_size.bin", b"Y" * 9000)
        rewrite("read_before.bin", b"X" * 4096)
        rewrite("touched.bin", files["touched.bin"])  # same bytes, new mtime
        (source / "deleted.bin").unlink()

        for name in ("same_size.bin", "other_size.bin", "deleted.bin"):
            with pytest.raises(OSError) as failure:
                (art / name).read_bytes()
            assert failure.value.errno == errno.EIO, (name, failure.value)
            with pytest.raises(OSError) as partial, open(art / name, "rb") as handle:
                handle.read(10)
            assert partial.value.errno == errno.EIO, (name, partial.value)
            assert os.stat(art / name).st_size == 4096  # still the tracked size
            assert str(source / name) in mount.log(), (name, mount.log())

        # Read before the change: the kernel may still hold the tracked bytes, but never
        # the new ones.
        try:
            again = (art / "read_before.bin").read_bytes()
        except OSError as exc:
            assert exc.errno == errno.EIO
        else:
            assert again == files["read_before.bin"]

        # A new mtime over the same bytes is re-hashed and served; untouched files still are.
        assert (art / "touched.bin").read_bytes() == files["touched.bin"]
        assert (art / "untouched.bin").read_bytes() == files["untouched.bin"]
        assert mount.root_figure("errors") >= 2


# -- 7. new runs appear ---------------------------------------------------------------------


def test_runs_tracked_while_mounted_appear_within_seconds(cli: Any, tmp_path: Path) -> None:
    first_files = {"a.txt": b"first\n", "d/b.txt": b"bee\n"}
    first = track(cli, "ml/cls", "data", make_tree(tmp_path / "one", first_files))

    with mounted(tmp_path / "mnt") as mount:
        project = mount.path / "ml" / "cls"
        old_art = project / first / "data"
        before = _inodes(old_art)
        assert os.listdir(project) == [first]
        assert os.listdir(mount.path) == ["ml"]

        second_files = {"new.txt": b"second\n", "x/y/z.bin": os.urandom(70_000)}
        second = track(cli, "ml/cls", "data", make_tree(tmp_path / "two", second_files))
        third = track(cli, "fresh", "inputs", make_tree(tmp_path / "three", {"t.txt": b"3"}))

        assert wait_for(lambda: second in os.listdir(project), 5.0), os.listdir(project)
        assert sorted(os.listdir(project)) == sorted([first, second])
        for rel, body in second_files.items():
            assert (project / second / "data" / rel).read_bytes() == body

        fresh = mount.path / "default" / "fresh"
        assert wait_for(lambda: "default" in os.listdir(mount.path), 5.0)
        assert wait_for(lambda: fresh.is_dir() and third in os.listdir(fresh), 5.0)
        assert (fresh / third / "inputs" / "t.txt").read_bytes() == b"3"

        assert _inodes(old_art) == before
        assert set(walk_files(old_art)) == set(first_files)
        for rel, body in first_files.items():
            assert (old_art / rel).read_bytes() == body


# -- 8. a killed daemon ---------------------------------------------------------------------


def _listdir_errno(path: Path) -> int:
    try:
        os.listdir(path)
    except OSError as exc:
        return exc.errno or 0
    return 0


@pytest.mark.backend_independent
def test_a_killed_daemon_is_recovered_by_unmount(cli: Any, tmp_path: Path) -> None:
    run_id = track(cli, "ml/cls", "data", make_tree(tmp_path / "src", {"a.txt": b"alive\n"}))
    mnt = tmp_path / "mnt"
    with mounted(mnt) as mount:
        assert (mnt / "ml" / "cls" / run_id / "data" / "a.txt").read_bytes() == b"alive\n"
        os.kill(mount.pid, signal.SIGKILL)
        assert wait_gone(mount.pid, 5)
        # A request caught in flight while the kernel aborts the connection gets
        # ECONNABORTED; once it is aborted, every access is ENOTCONN.
        assert wait_for(lambda: _listdir_errno(mnt) == errno.ENOTCONN, 5.0), _listdir_errno(mnt)
        with pytest.raises(OSError) as broken:
            os.listdir(mnt)
        assert broken.value.errno == errno.ENOTCONN

        result = cli("unmount", str(mnt))
        assert result.returncode == 0, result
        assert not is_mounted(str(mnt))
        assert not in_proc_mounts(mnt)
        assert os.listdir(mnt) == []

    with mounted(mnt) as mount:
        assert (mnt / "ml" / "cls" / run_id / "data" / "a.txt").read_bytes() == b"alive\n"
        assert pid_alive(mount.pid)


# -- 9. errors of mount and unmount ---------------------------------------------------------


@pytest.mark.backend_independent
def test_mount_and_unmount_print_an_odd_mount_point_as_one_quoted_line(
    cli: Any, tmp_path: Path
) -> None:
    run_id = track(cli, "ml/cls", "data", make_tree(tmp_path / "src", {"a.txt": b"a\n"}))
    odd = tmp_path / 'mnt\n"q"'
    odd.mkdir()
    quoted = f'"{tmp_path}/mnt\\n\\"q\\""'
    pid = None
    try:
        started = cli("mount", str(odd), "--run", run_id)
        assert started.returncode == 0, started
        found = re.search(r"daemon pid (\d+)", started.stdout)
        pid = int(found.group(1)) if found else None
        assert started.stdout.startswith(f"mounted at {quoted} (daemon pid "), started.stdout
        assert started.stdout.count("\n") == 1
        assert (odd / "data" / "a.txt").read_bytes() == b"a\n"
        stopped = cli("unmount", str(odd))
        assert (stopped.returncode, stopped.stdout) == (0, f"unmounted {quoted}\n"), stopped
    finally:
        force_unmount(odd, pid)


@pytest.mark.backend_independent
def test_mount_and_unmount_errors_are_one_line_and_mount_nothing(cli: Any, tmp_path: Path) -> None:
    run_id = track(cli, "ml/cls", "data", make_tree(tmp_path / "src", {"a.txt": b"a\n"}))

    result = cli("mount", str(tmp_path / "no-such-dir"))
    assert_one_line_error(result)
    assert f"mount point {tmp_path / 'no-such-dir'} does not exist" in result.stderr

    no_run = tmp_path / "no_run"
    no_run.mkdir()
    result = cli("mount", str(no_run), "--run", "CLS-999")
    assert_one_line_error(result)
    assert "CLS-999" in result.stderr
    assert_not_mounted(no_run)

    no_field = tmp_path / "no_field"
    no_field.mkdir()
    result = cli("mount", str(no_field), "--run", run_id, "--field", "nope")
    assert_one_line_error(result)
    assert_not_mounted(no_field)

    field_only = tmp_path / "field_only"
    field_only.mkdir()
    result = cli("mount", str(field_only), "--field", "data")
    assert_one_line_error(result)
    assert_not_mounted(field_only)

    for bad in ("0", "forever"):
        result = cli("mount", str(field_only), "--run", run_id, "--read-deadline", bad)
        assert_one_line_error(result)
        assert "invalid read deadline" in result.stderr
        assert_not_mounted(field_only)

    a_file = tmp_path / "a_file"
    a_file.write_bytes(b"not a directory")
    for option in ("--cache-dir", "--log-file"):
        result = cli("mount", str(field_only), "--run", run_id, option, str(a_file / "sub"))
        assert_one_line_error(result)
        assert str(a_file / "sub") in result.stderr
        assert_not_mounted(field_only)
    for command in ("stats", "clear", "fsck"):
        result = cli("cache", command, "--cache-dir", str(a_file))
        assert_one_line_error(result)
        assert f"cannot use cache directory {a_file}" in result.stderr
    assert a_file.read_bytes() == b"not a directory"

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_bytes(b"mine")
    try:
        result = cli("mount", str(full))
        assert_one_line_error(result)
        assert not is_mounted(str(full))
        assert (full / "keep.txt").read_bytes() == b"mine"
    finally:
        if is_mounted(str(full)):
            force_unmount(full, None)

    with mounted(tmp_path / "busy") as mount:
        result = cli("mount", str(mount.path))
        assert_one_line_error(result)
        # The first mount is untouched and still serves.
        assert (mount.path / "ml" / "cls" / run_id / "data" / "a.txt").read_bytes() == b"a\n"
        assert pid_alive(mount.pid)
        assert [m for m in artifactfs_mounts() if m == str(mount.path)] == [str(mount.path)]

    plain = tmp_path / "plain"
    plain.mkdir()
    result = cli("unmount", str(plain))
    assert_one_line_error(result)
    assert str(plain) in result.stderr


# -- 10. SIGTERM ----------------------------------------------------------------------------


@pytest.mark.backend_independent
def test_sigterm_unmounts_cleanly(cli: Any, tmp_path: Path) -> None:
    run_id = track(cli, "ml/cls", "data", make_tree(tmp_path / "src", {"a.txt": b"a\n"}))
    with mounted(tmp_path / "mnt") as mount:
        assert (mount.path / "ml" / "cls" / run_id / "data" / "a.txt").read_bytes() == b"a\n"
        os.kill(mount.pid, signal.SIGTERM)
        assert wait_for(lambda: not in_proc_mounts(mount.path), 5.0), "still mounted"
        assert wait_gone(mount.pid, 5.0), "daemon still running"
        assert not is_mounted(str(mount.path))
        assert os.listdir(mount.path) == []
        assert "unmounted" in mount.log()


# -- 11. a large directory ------------------------------------------------------------------


def test_five_thousand_files_in_one_directory(cli: Any, tmp_path: Path) -> None:
    count = 5000
    many = tmp_path / "src" / "many"
    many.mkdir(parents=True)
    bodies = {f"{i:05d}.txt": f"file {i}\n".encode() * (1 + i % 7) for i in range(count)}
    for name, body in bodies.items():
        (many / name).write_bytes(body)
    run_id = track(cli, "ml/cls", "big", tmp_path / "src")

    with mounted(tmp_path / "mnt", "--run", run_id, "--field", "big") as mount:
        directory = mount.path / "many"
        names = os.listdir(directory)
        assert len(names) == count
        assert set(names) == set(bodies)
        seen = 0
        with os.scandir(directory) as entries:
            for entry in entries:
                info = entry.stat()
                assert entry.is_file(), entry.name
                assert info.st_size == len(bodies[entry.name]), entry.name
                assert stat.S_IMODE(info.st_mode) == 0o444
                seen += 1
        assert seen == count
        for name in sorted(bodies)[::499]:
            assert (directory / name).read_bytes() == bodies[name]
        assert mount.xattr("", "file_count") == str(count)


# -- 12. `.` and `..` -----------------------------------------------------------------------


def ls_a(directory: Path) -> list[str]:
    """The names `ls -a` prints, in its order."""
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    listing = subprocess.run(
        ["ls", "-a", "-1", "--quoting-style=literal", str(directory)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert listing.returncode == 0, listing.stderr
    return listing.stdout.splitlines()


class Dirent(ctypes.Structure):
    """glibc's `struct dirent` on 64-bit Linux."""

    _fields_ = [
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    ]


def readdir_inodes(directory: Path) -> list[tuple[str, int]]:
    """(name, d_ino) as readdir(3) returns them, `.` and `..` included: os.scandir leaves
    those out, and `ls -i` stats directories instead of trusting d_ino."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.readdir.restype = ctypes.POINTER(Dirent)
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.closedir.argtypes = [ctypes.c_void_p]
    handle = libc.opendir(os.fsencode(directory))
    assert handle, os.strerror(ctypes.get_errno())
    found = []
    try:
        while entry := libc.readdir(handle):
            found.append((os.fsdecode(entry.contents.d_name), entry.contents.d_ino))
    finally:
        libc.closedir(handle)
    return found


@pytest.mark.backend_independent
def test_ls_a_shows_dot_and_dotdot_once_each(cli: Any, tmp_path: Path) -> None:
    # Enough names in one directory that the kernel reads its listing in many readdir calls.
    many = {f"sub/deep/{i:04d}.txt": b"%d\n" % i for i in range(600)}
    files = {"a.txt": b"a\n", "sub/b.txt": b"bee\n", **many}
    run_id = track(cli, "ml/cls", "data", make_tree(tmp_path / "src", files))

    with mounted(tmp_path / "mnt") as mount:
        run_dir = mount.path / "ml" / "cls" / run_id
        nested = run_dir / "data" / "sub" / "deep"
        children = {
            mount.path: ["ml"],
            run_dir: ["data"],
            run_dir / "data" / "sub": ["b.txt", "deep"],
            nested: sorted(name.rsplit("/", 1)[-1] for name in many),
        }
        for directory, names in children.items():
            assert sorted(ls_a(directory)) == sorted([".", "..", *names]), directory
            assert sorted(os.listdir(directory)) == names, directory  # Python leaves them out
            listed = readdir_inodes(directory)
            assert sorted(name for name, _ in listed) == sorted([".", "..", *names])
            inodes = dict(listed)
            assert inodes["."] == os.stat(directory).st_ino, directory
            if directory == mount.path:  # its `..` is outside the mount: it lists itself
                assert inodes[".."] == inodes["."], directory
            else:
                assert inodes[".."] == os.stat(directory / "..").st_ino, directory
                assert inodes[".."] == os.stat(directory.parent).st_ino, directory

        # `find` still shows each path once, no `.` or `..` among them.
        found = subprocess.run(
            ["find", str(run_dir)], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        expected = {"", "data", "data/sub", "data/sub/deep"} | {f"data/{rel}" for rel in files}
        assert len(found) == len(expected)
        assert {str(Path(p).relative_to(run_dir)).removeprefix(".") for p in found} == expected
