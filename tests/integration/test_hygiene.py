"""Hygiene of a mount: what it leaves on disk, what it writes in logs and xattrs, who can read it.

- The cache directory (chunks, temporary files, logs, the local hash cache) is private to the
  mounting user: directories 0700, files 0600, whatever the umask, including the directories the
  mount creates itself.
- Credentials (access key id, secret, session token) and anything like a signed URL never appear
  in the daemon's log, the mount command's output or the extended attributes, even when the
  server's error answers echo them.
- Without `-o allow_other` another user cannot enter the mount, even where the directory above
  it is open to everyone; with it, they can read (the control).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import artifactfs
from tests.conftest import make_tree
from tests.integration.test_faults import (
    Backend,
    backend,
    mount_through_proxy,
    read_file,
    track_field,
)
from tests.support.mounts import artifact_args, mounted

SECRET = "hygieneSECRETkey/" + uuid.uuid4().hex
KEY_ID = "AKIAHYGIENE" + uuid.uuid4().hex[:9].upper()
TOKEN = "hygieneSESSIONtoken" + uuid.uuid4().hex
# What a signed URL or a signed request carries; none of it belongs in a log.
SIGNED_MARKERS = [
    "X-Amz-Signature",
    "X-Amz-Credential",
    "X-Amz-Security-Token",
    "Signature=",
    "AWSAccessKeyId",
    "X-Goog-Signature",
    "X-Goog-Credential",
    "Authorization:",
    "AWS4-HMAC-SHA256",
    "Bearer ",
]


def secrets_in(text: str) -> list[str]:
    found = [
        name
        for name, value in (("secret", SECRET), ("key id", KEY_ID), ("token", TOKEN))
        if value in text
    ]
    found += [marker for marker in SIGNED_MARKERS if marker.lower() in text.lower()]
    return found


def modes(root: Path) -> dict[str, str]:
    """Every path below root (and root), with its permission bits in octal."""
    found = {".": oct(stat.S_IMODE(root.stat().st_mode))}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = oct(stat.S_IMODE(path.lstat().st_mode))
    return found


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# -- the cache directory is private ---------------------------------------------------------------


@pytest.mark.s3
@pytest.mark.parametrize("where", ["--cache-dir", "default"])
def test_cache_directory_and_files_are_private(
    s3: Any, tmp_path: Path, umask_022: None, where: str, isolated_home: Path
) -> None:
    local = make_tree(tmp_path / "local", {"l.txt": b"local bytes\n"})
    s3.put("priv/r.bin", os.urandom(300_000))
    run = artifactfs.init_run(project="hygiene/private")
    run["data"].track_files(s3.url("priv/r.bin"))
    run["local"].track_files(str(local))
    run.stop()
    if where == "default":
        cache = isolated_home / ".cache" / "artifactfs"
        args: tuple[str, ...] = ()
    else:
        cache = tmp_path / "new" / "cache"  # does not exist yet: the mount creates it
        args = ("--cache-dir", str(cache))
    with mounted(tmp_path / "mnt", "--run", run.id, *args) as mount:
        assert (mount.path / "data" / "r.bin").stat().st_size == 300_000
        read_file(mount.path / "data" / "r.bin")
        read_file(mount.path / "local" / "l.txt")  # the local hash cache
    assert cache.is_dir()
    found = modes(cache)
    assert any(name.startswith("data/chunks/") for name in found), found
    wrong = {
        name: mode
        for name, mode in found.items()
        if mode != ("0o700" if (cache / name).is_dir() else "0o600")
    }
    assert not wrong, f"not private (want 0700 directories, 0600 files): {wrong}"


# -- no credentials in logs or xattrs ------------------------------------------------------------


@pytest.mark.s3
def test_credentials_and_signatures_never_appear_in_logs_or_xattrs(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with backend("s3", request) as remote:
        _check_no_secrets(remote, tmp_path, monkeypatch)


def _check_no_secrets(remote: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bodies = {name: os.urandom(200_000) for name in ("retried.bin", "denied.bin", "flipped.bin")}
    for name, body in bodies.items():
        remote.put(f"sec/{name}", body)
    run = artifactfs.init_run(project="hygiene/secrets")
    track_field(run, "data", remote.url("sec"))
    run.stop()
    # The server's answers: a reset and a 500 (retried), a denial that echoes the credentials
    # and the signature as real S3 does for SignatureDoesNotMatch (retried, then served), and
    # other bytes (EIO). Every one of them is logged.
    denial = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SignatureDoesNotMatch</Code>'
        "<Message>The request signature we calculated does not match the signature you "
        f"provided.</Message><AWSAccessKeyId>{KEY_ID}</AWSAccessKeyId>"
        f"<StringToSign>AWS4-HMAC-SHA256\n20240101T000000Z\n{SECRET}</StringToSign>"
        "<SignatureProvided>0123456789abcdef</SignatureProvided>"
        f"<CanonicalRequest>GET /x X-Amz-Security-Token={TOKEN}</CanonicalRequest></Error>"
    ).encode()
    remote.proxy.add("reset", remote.request_match("sec/retried.bin"), times=1)
    remote.proxy.add("status", remote.request_match("sec/retried.bin"), times=1, status=500)
    remote.proxy.add(
        "status", remote.request_match("sec/denied.bin"), times=2, status=403, body=denial
    )
    remote.proxy.add("flip", remote.request_match("sec/flipped.bin"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    cache = tmp_path / "cache"
    with mount_through_proxy(
        monkeypatch,
        [remote],
        tmp_path / "mnt",
        *artifact_args(run.id, "data", cache),
    ) as mount:
        assert read_file(mount.path / "retried.bin") == bodies["retried.bin"]
        try:
            denied = read_file(mount.path / "denied.bin")
        except OSError:
            denied = b""
        with pytest.raises(OSError):
            read_file(mount.path / "flipped.bin")
        xattrs = {}
        for path in [mount.path, *mount.path.iterdir()]:
            for name in os.listxattr(path):
                xattrs[f"{path.name}:{name}"] = os.getxattr(path, name).decode("utf-8", "replace")
        log = mount.log()
    assert remote.proxy.faults_applied() >= 4, "the faults were not all served"
    # The failures the daemon saw were logged, with the server's message.
    assert "flipped.bin" in log and "SignatureDoesNotMatch" in log, log
    assert denied in (b"", bodies["denied.bin"])
    leaks = {"daemon log": secrets_in(log)}
    for path in cache.rglob("*"):
        if path.is_file() and "chunks" not in path.parts:
            leaks[str(path.relative_to(cache))] = secrets_in(
                path.read_bytes().decode("utf-8", "replace")
            )
    leaks.update({name: secrets_in(value) for name, value in xattrs.items()})
    leaks = {where: found for where, found in leaks.items() if found}
    assert not leaks, f"credentials or signatures found: {leaks}"


# -- another user and allow_other -----------------------------------------------------------------

# One name per test process: two sessions on one machine must not delete each other's user.
OTHER_USER = f"afs-hygiene-{os.getpid()}"


@pytest.fixture
def other_user() -> Iterator[str]:
    """A throwaway user, removed afterwards if this fixture created it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a user and run commands as that user")
    exists = subprocess.run(["id", "-u", OTHER_USER], capture_output=True).returncode == 0
    if not exists:
        subprocess.run(
            ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER],
            check=True,
            capture_output=True,
        )
    try:
        yield OTHER_USER
    finally:
        if not exists:
            subprocess.run(["userdel", OTHER_USER], capture_output=True)


@pytest.fixture
def open_directory() -> Iterator[Path]:
    """A directory every user may enter (tmp_path is private to root, which would make the
    test pass for the wrong reason)."""
    directory = Path(tempfile.mkdtemp(prefix="afs-hygiene-", dir="/tmp"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def as_user(user: str, *command: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["runuser", "-u", user, "--", *command], capture_output=True, timeout=30)


def test_another_user_cannot_read_the_mount_without_allow_other(
    other_user: str, open_directory: Path, tmp_path: Path
) -> None:
    body = b"only for the mounting user\n"
    data = make_tree(open_directory / "data", {"f.txt": body})
    (open_directory / "data").chmod(0o755)
    run = artifactfs.init_run(project="hygiene/users")
    run["data"].track_files(str(data))
    run.stop()
    mountpoint = open_directory / "mnt"
    mountpoint.mkdir()
    mountpoint.chmod(0o755)
    args = ("--run", run.id, "--field", "data", "--cache-dir", str(tmp_path / "cache"))

    # The control: the directory holding the mount is open to the other user.
    assert as_user(other_user, "ls", str(open_directory)).returncode == 0

    with mounted(mountpoint, *args) as mount:
        assert (mount.path / "f.txt").read_bytes() == body
        cat = as_user(other_user, "cat", str(mount.path / "f.txt"))
        assert cat.returncode != 0 and body not in cat.stdout, cat
        assert b"Permission denied" in cat.stderr, cat.stderr
        listing = as_user(other_user, "ls", str(mount.path))
        assert listing.returncode != 0, listing
        xattr = as_user(other_user, "getfattr", "-d", str(mount.path / "f.txt"))
        assert b"artifactfs" not in xattr.stdout, xattr

    with mounted(mountpoint, *args, "-o", "allow_other") as mount:
        cat = as_user(other_user, "cat", str(mount.path / "f.txt"))
        assert cat.returncode == 0 and cat.stdout == body, cat
        write = as_user(other_user, "sh", "-c", f"echo x > {mount.path / 'new.txt'}")
        assert write.returncode != 0, write
