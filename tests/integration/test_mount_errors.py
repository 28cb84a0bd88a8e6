"""Real FUSE mounts where things go wrong: names a listing never shows, a field tracked again,
`unmount` of somebody else's file system or of a busy mount, a dead daemon's mount point, a
symlinked mount point, SIGTERM while a server never answers, chunk sizes out of range."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from artifactfs.fs.daemon import is_mounted
from tests.conftest import make_tree
from tests.support.mounts import artifactfs_mounts, force_unmount, mounted, pid_alive, wait_gone

MiB = 1024 * 1024


# -- helpers --------------------------------------------------------------------------------


def track(cli: Any, field: str, path: str, *extra: str) -> str:
    """`artifactfs --project ml/cls track [extra] FIELD PATH`; the run id it prints."""
    return cli("--project", "ml/cls", "track", *extra, field, path, check=True).last_line


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def in_proc_mounts(path: Path) -> bool:
    with open("/proc/mounts") as mounts:
        return any(line.split()[1] == str(path) for line in mounts if line.strip())


def one_line_error(result: Any) -> str:
    """The single stderr line of a refused command (exit 2, no traceback)."""
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("artifactfs: error:"), lines[0]
    return lines[0]


def errno_of(call: Callable[[], object]) -> int:
    try:
        call()
    except OSError as exc:
        return exc.errno or 0
    return 0


def bounded_listdir(path: Path, timeout: float) -> list[str] | None:
    """`os.listdir(path)`, or None if it did not answer within `timeout` (a hung mount)."""
    answer: list[list[str]] = []
    worker = threading.Thread(target=lambda: answer.append(os.listdir(path)), daemon=True)
    worker.start()
    worker.join(timeout)
    return answer[0] if answer else None


@contextmanager
def busy_in(directory: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process whose working directory is `directory` (what makes a mount busy)."""
    process = subprocess.Popen(["sleep", "60"], cwd=directory)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


@contextmanager
def silent_server() -> Iterator[tuple[str, list[socket.socket]]]:
    """An HTTP endpoint on 127.0.0.1 that accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", held
    finally:
        stop.set()
        acceptor.join(5)
        for connection in held:
            connection.close()
        listener.close()


requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")


# -- names ----------------------------------------------------------------------------------


def test_a_run_does_not_answer_to_its_name_with_whitespace(cli: Any, tmp_path: Path) -> None:
    run_id = track(cli, "data", str(make_tree(tmp_path / "src", {"a.txt": b"a\n"})))
    with mounted(tmp_path / "mnt", "--cache-dir", str(tmp_path / "cache")) as mount:
        project = mount.path / "ml" / "cls"
        assert os.listdir(project) == [run_id]
        assert (project / run_id / "data" / "a.txt").read_bytes() == b"a\n"
        for alias in (f"{run_id} ", f" {run_id}", f"\t{run_id}", f"{run_id}\n"):
            assert errno_of(lambda alias=alias: os.stat(project / alias)) == errno.ENOENT, alias
        assert os.listdir(project) == [run_id]


def test_a_field_tracked_again_shows_its_new_files_by_path_within_seconds(
    cli: Any, tmp_path: Path
) -> None:
    run_id = track(cli, "data", str(make_tree(tmp_path / "one", {"a.txt": b"a\n"})))
    with mounted(tmp_path / "mnt", "--cache-dir", str(tmp_path / "cache")) as mount:
        field = mount.path / "ml" / "cls" / run_id / "data"
        assert os.listdir(field) == ["a.txt"]
        assert errno_of(lambda: (field / "new.txt").stat()) == errno.ENOENT
        new = make_tree(tmp_path / "two", {"new.txt": b"new\n"})
        track(cli, "data", str(new / "new.txt"), "--run", run_id)
        # SPEC: changes above an artifact show within seconds, without a listing of the run.
        assert wait_for(lambda: (field / "new.txt").exists(), 5.0), "new.txt not shown"
        assert (field / "new.txt").read_bytes() == b"new\n"
        assert sorted(os.listdir(field)) == ["a.txt", "new.txt"]
        assert (field / "a.txt").read_bytes() == b"a\n"


# -- unmount: only our own, never a busy live one -------------------------------------------


@requires_root
def test_unmount_refuses_a_file_system_that_is_not_artifactfs(cli: Any, tmp_path: Path) -> None:
    other = tmp_path / "tmpfs"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "test-tmpfs", str(other)], check=True)
    try:
        (other / "keep").write_bytes(b"mine")
        with busy_in(other):
            message = one_line_error(cli("unmount", str(other)))
            assert "not an artifactfs mount" in message and "tmpfs" in message
            assert in_proc_mounts(other)
            assert (other / "keep").read_bytes() == b"mine"
        message = one_line_error(cli("unmount", str(other)))  # idle, still not ours
        assert "not an artifactfs mount" in message
        assert (other / "keep").read_bytes() == b"mine"
    finally:
        if in_proc_mounts(other):
            subprocess.run(["umount", "-l", str(other)], check=False)
    assert not in_proc_mounts(other)


def test_unmount_of_a_busy_live_mount_says_busy_and_leaves_it_serving(
    cli: Any, tmp_path: Path
) -> None:
    run_id = track(cli, "data", str(make_tree(tmp_path / "src", {"a.txt": b"a\n"})))
    with mounted(tmp_path / "mnt", "--cache-dir", str(tmp_path / "cache")) as mount:
        inside = mount.path / "ml" / "cls" / run_id / "data"
        with busy_in(inside):
            message = one_line_error(cli("unmount", str(mount.path)))
            assert "busy" in message
            assert f"fusermount3 -uz {mount.path}" in message  # what the user can do now
            assert in_proc_mounts(mount.path)
            assert (inside / "a.txt").read_bytes() == b"a\n"
            assert pid_alive(mount.pid)
        result = cli("unmount", str(mount.path))
        assert result.returncode == 0, result
        assert not in_proc_mounts(mount.path)
        assert wait_gone(mount.pid, 10)


def test_unmount_of_a_dead_daemons_busy_mount_detaches_it(cli: Any, tmp_path: Path) -> None:
    track(cli, "data", str(make_tree(tmp_path / "src", {"a.txt": b"a\n"})))
    mnt = tmp_path / "mnt"
    with mounted(mnt, "--cache-dir", str(tmp_path / "cache")) as mount, busy_in(mnt / "ml"):
        os.kill(mount.pid, signal.SIGKILL)
        assert wait_gone(mount.pid, 5)
        result = cli("unmount", str(mnt))  # the lazy way: nobody can serve it any more
        assert result.returncode == 0, result
        assert not in_proc_mounts(mnt)
        assert os.listdir(mnt) == []


# -- mount points ---------------------------------------------------------------------------


def test_mounting_on_a_dead_daemons_mount_point_says_how_to_recover(
    cli: Any, tmp_path: Path
) -> None:
    run_id = track(cli, "data", str(make_tree(tmp_path / "src", {"a.txt": b"a\n"})))
    mnt = tmp_path / "mnt"
    cache = ("--cache-dir", str(tmp_path / "cache"))
    with mounted(mnt, *cache) as mount:
        os.kill(mount.pid, signal.SIGKILL)
        assert wait_gone(mount.pid, 5)
        assert wait_for(lambda: errno_of(lambda: os.listdir(mnt)) == errno.ENOTCONN, 5.0)

        message = one_line_error(cli("mount", str(mnt), *cache))
        assert f"mount point {mnt} was left by a daemon that died" in message
        assert f"run `artifactfs unmount {mnt}`" in message
        assert artifactfs_mounts().count(str(mnt)) == 1  # nothing mounted on top

        result = cli("unmount", str(mnt))
        assert result.returncode == 0, result
        assert not in_proc_mounts(mnt)
    with mounted(mnt, *cache) as mount:
        assert (mnt / "ml" / "cls" / run_id / "data" / "a.txt").read_bytes() == b"a\n"


def test_mount_and_unmount_through_a_symlinked_mount_point(cli: Any, tmp_path: Path) -> None:
    run_id = track(cli, "data", str(make_tree(tmp_path / "src", {"a.txt": b"a\n"})))
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with mounted(link, "--cache-dir", str(tmp_path / "cache")) as mount:
        assert in_proc_mounts(real)
        assert (link / "ml" / "cls" / run_id / "data" / "a.txt").read_bytes() == b"a\n"
        message = one_line_error(cli("mount", str(link), "--cache-dir", str(tmp_path / "c2")))
        assert f"{real} is already a mount point" in message

        result = cli("unmount", str(link))
        assert result.returncode == 0, result
        assert not in_proc_mounts(real)
        assert wait_gone(mount.pid, 10)
        assert os.listdir(real) == []
    assert not is_mounted(str(real))


# -- SIGTERM while a read waits on a server -------------------------------------------------


def test_sigterm_while_a_server_never_answers_unmounts_promptly(
    cli: Any, tmp_path: Path, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.put("stall/big.bin", os.urandom(3 * MiB))
    run_id = track(cli, "data", s3.url("stall/big.bin"))
    with silent_server() as (url, held):
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)  # the mount reads from the silent one
        args = ("--run", run_id, "--field", "data", "--cache-dir", str(tmp_path / "cache"))
        with mounted(tmp_path / "mnt", *args) as mount:
            target = mount.path / "big.bin"
            reader = subprocess.Popen(
                ["cat", str(target)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            try:
                assert wait_for(lambda: bool(held), 10.0), "the read never reached the server"
                time.sleep(0.5)
                assert reader.poll() is None  # still waiting for its bytes
                os.kill(mount.pid, signal.SIGTERM)
                # Gone well before the 30 s read deadline, and nothing hangs meanwhile.
                assert wait_for(lambda: not in_proc_mounts(mount.path), 5.0), "still mounted"
                assert bounded_listdir(mount.path, 3.0) == []
                assert reader.wait(timeout=5) != 0  # an error, not bytes, not a hang
                assert wait_gone(mount.pid, 15.0), "daemon still running"
                assert "signal 15: unmounting" in mount.log()
            finally:
                if reader.poll() is None:
                    reader.kill()
                    reader.wait()


# -- options --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["1", "4K", "63K", "2G", "64T"])
def test_chunk_sizes_out_of_range_are_refused_and_mount_nothing(
    cli: Any, tmp_path: Path, size: str
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = tmp_path / "cache"
    try:
        message = one_line_error(
            cli("mount", str(mnt), "--chunk-size", size, "--cache-dir", str(cache))
        )
        assert "invalid chunk size" in message and "64K to 1G" in message
        assert not is_mounted(str(mnt))
        assert not cache.exists()  # refused before anything was made
    finally:
        if is_mounted(str(mnt)):
            force_unmount(mnt, None)


def test_open_for_reading_with_o_append_reads_the_file(cli: Any, tmp_path: Path) -> None:
    run_id = track(cli, "data", str(make_tree(tmp_path / "src", {"a.txt": b"hello\n"})))
    with mounted(tmp_path / "mnt", "--cache-dir", str(tmp_path / "cache")) as mount:
        path = mount.path / "ml" / "cls" / run_id / "data" / "a.txt"
        descriptor = os.open(path, os.O_RDONLY | os.O_APPEND)
        try:
            assert os.read(descriptor, 100) == b"hello\n"
        finally:
            os.close(descriptor)
        for flags in (os.O_WRONLY | os.O_APPEND, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
            assert errno_of(lambda flags=flags: os.open(path, flags)) == errno.EROFS, flags
