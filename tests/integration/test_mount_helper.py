"""`mount.artifactfs`, as mount(8) calls it for an fstab line of type `artifactfs`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from artifactfs.errors import ArtifactfsError
from artifactfs.fs.daemon import is_mounted
from artifactfs.fs.mount_helper import options_from
from tests.conftest import make_tree
from tests.support.mounts import force_unmount

HELPER = str(Path(sys.executable).parent / "mount.artifactfs")


def test_fstab_style_mount_serves_the_run(cli, tmp_path: Path, store_uri: str) -> None:
    data = make_tree(tmp_path / "data", {"a.csv": b"1,2\n"})
    run_id = cli("--store", store_uri, "--project", "t/p", "track", "f", str(data)).last_line
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    options = f"defaults,_netdev,nofail,run={run_id},cache_dir={tmp_path / 'cache'},cache_size=1G"
    try:
        result = subprocess.run(
            [HELPER, store_uri, str(mountpoint), "-o", options],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert is_mounted(str(mountpoint))
        assert (mountpoint / "f" / "a.csv").read_bytes() == b"1,2\n"
        # `ps` showed the daemon as the helper's command, the store URI (and any password in
        # it) included, to every user of the host, for as long as the mount lived.
        assert daemon_command_lines(mountpoint) == [f"artifactfs: daemon of {mountpoint}"]
    finally:
        force_unmount(mountpoint, None)
    assert not is_mounted(str(mountpoint))


def daemon_command_lines(mountpoint: Path) -> list[str]:
    """The command lines, as `ps` shows them, of the processes that name the mount point."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            line = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, UnicodeDecodeError):
            continue
        if str(mountpoint) in line:
            found.append(line)
    return found


def test_unknown_options_and_bad_usage_fail_with_mounts_code(tmp_path: Path) -> None:
    result = subprocess.run(
        [HELPER, "default", str(tmp_path), "-o", "colour=blue"], capture_output=True, text=True
    )
    assert result.returncode == 32
    assert "unknown mount option 'colour=blue'" in result.stderr
    assert not is_mounted(str(tmp_path))
    result = subprocess.run([HELPER, "only-one-arg"], capture_output=True, text=True)
    assert result.returncode == 32
    assert "usage" in result.stderr
    # `mount -f` (fake): the options are checked, nothing is mounted. It mounted.
    try:
        result = subprocess.run(
            [HELPER, "default", str(tmp_path), "-f", "-o", "cache_size=1G"], capture_output=True
        )
        assert result.returncode == 0, result
        assert not is_mounted(str(tmp_path))
    finally:
        if is_mounted(str(tmp_path)):
            force_unmount(tmp_path, None)
    result = subprocess.run([HELPER, "default", str(tmp_path), "-f", "-o", "colour=blue"])
    assert result.returncode == 32


def test_options_are_translated() -> None:
    options = options_from(
        "postgresql://u@h/db",
        "/mnt/x",
        "run=CLS-1,field=data,cache_size=2G,read_deadline=7.5,allow_other,x-systemd.after=x",
    )
    assert (options.store_uri, options.run_id, options.field_path) == (
        "postgresql://u@h/db",
        "CLS-1",
        "data",
    )
    assert options.cache_size == 2 * 1024**3
    assert options.read_deadline == 7.5
    assert options.allow_other
    assert options_from("default", "/mnt/x", "").store_uri is None
    with pytest.raises(ArtifactfsError, match="needs the run option"):
        options_from("default", "/mnt/x", "field=data")
    for bad in ("0", "-3", "nan", "soon", "7200"):
        with pytest.raises(ArtifactfsError, match="invalid read deadline"):
            options_from("default", "/mnt/x", f"read_deadline={bad}")


def test_the_options_mount_8_adds_or_takes_for_any_file_system_are_ignored() -> None:
    """A `user` line gets noexec,nosuid,nodev added by mount(8): every such line failed with
    `unknown mount option 'noexec'`; so did `comment=...` (compared after its `=` was cut)."""
    options = options_from(
        "default",
        "/mnt/x",
        "run=CLS-1,user,noexec,nosuid,nodev,users,nouser,noatime,relatime,sync,comment=ml,"
        "x-gvfs-hide,_netdev,nofail",
    )
    assert options.run_id == "CLS-1"
    assert not options.allow_other


def test_allow_other_with_a_value_and_bad_chunk_sizes_are_refused(tmp_path: Path) -> None:
    for bad in ("allow_other=0", "allow_other=1", "allow_other="):
        with pytest.raises(ArtifactfsError, match="allow_other takes no value"):
            options_from("default", "/mnt/x", bad)
    for bad in ("1", "63K", "2G", "64T"):
        with pytest.raises(ArtifactfsError, match="invalid chunk size"):
            options_from("default", "/mnt/x", f"chunk_size={bad}")
    assert options_from("default", "/mnt/x", "chunk_size=64K").chunk_size == 64 * 1024
    assert options_from("default", "/mnt/x", "chunk_size=1G").chunk_size == 1024**3

    # What mount(8) runs for an fstab line: refused with mount's code, nothing mounted.
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        for option in ("allow_other=0", "chunk_size=1"):
            result = subprocess.run(
                [HELPER, "default", str(mountpoint), "-o", f"{option},cache_dir={tmp_path}/c"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode == 32, result
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
            assert not is_mounted(str(mountpoint))
    finally:
        if is_mounted(str(mountpoint)):
            force_unmount(mountpoint, None)
