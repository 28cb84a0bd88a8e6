"""artifactfs against a real GCS server (gcp-storage-emulator on 127.0.0.1): what a user checks.

Hashes are the objects' MD5s, generations are recorded, downloads reproduce every byte, and an
object overwritten after tracking is reported by name. This emulator ignores generation pins and
preconditions, so these tests also show the change is caught from the response's identity and
the content hash. Uploads to the emulator are slow: a few dozen objects at most.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from datetime import timezone
from pathlib import Path
from typing import Any

import pytest

import artifactfs
from tests.support.bucket_tracking import (
    check_an_object_that_is_also_a_folder_is_tracked_as_named,
    check_names_holding_wildcard_characters_are_tracked_as_named,
)
from tests.support.mounts import artifact_args, mounted
from tests.support.stores import make_local_store, store_counts

pytestmark = pytest.mark.gcs

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")


# -- helpers ----------------------------------------------------------------------------------


def md5_hex_of(blob: Any) -> str:
    return base64.b64decode(blob.md5_hash).hex()


def track(url: str, field: str = "data", project: str = "ml/cls") -> artifactfs.Run:
    run = artifactfs.init_run(project=project)
    run[field].track_files(url)
    return run


def files_by_path(run: artifactfs.Run, field: str = "data") -> dict[str, Any]:
    return {f.file_path: f for f in run[field].fetch_files_list()}


def assert_one_line_refusal(result: Any, code: int = 2) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr.strip()


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)).replace(os.sep, "/"): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if p.name.startswith(".artifactfs-")]


# -- tracking ---------------------------------------------------------------------------------


def test_prefix_entries_carry_md5_generation_type_and_location(gcs) -> None:
    bodies = {
        "datasets/train/a.csv": b"a,b\n1,2\n",
        "datasets/train/deep/b.bin": bytes(range(256)) * 40,
        "datasets/readme.txt": b"hello gcs\n",
    }
    blobs = {name: gcs.put(name, body) for name, body in bodies.items()}

    run = track(gcs.url("datasets"))
    files = files_by_path(run)

    assert set(files) == {"train/a.csv", "train/deep/b.bin", "readme.txt"}
    for name, body in bodies.items():
        entry = files[name[len("datasets/") :]]
        blob = blobs[name]
        assert entry.file_hash == md5_hex_of(blob) == hashlib.md5(body).hexdigest()
        assert entry.metadata["generation"] == str(blob.generation)
        assert entry.size == len(body)
        assert entry.type == "GCS"
        assert entry.metadata["file_path"] == f"gs://{gcs.name}/{name}"
        assert entry.metadata["location"] == f"gs://{gcs.name}/{name}"
        assert TIMESTAMP.match(entry.metadata["last_modified"])
        updated = blob.updated.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        assert entry.metadata["last_modified"] == updated


def test_the_mount_shows_which_generation_was_tracked(gcs, tmp_path: Path) -> None:
    """What `gsutil cp gs://b/o#GENERATION` needs: in the entry, but no attribute showed it."""
    blob = gcs.put("gen/a.bin", b"generation one")
    run = track(gcs.url("gen"))
    with mounted(tmp_path / "mnt", *artifact_args(run.id, "data", tmp_path / "cache")) as mount:
        path = mount.path / "a.bin"
        assert os.getxattr(path, "user.artifactfs.generation") == str(blob.generation).encode()
        assert "user.artifactfs.hash_algorithm" not in os.listxattr(path)  # an MD5: no mark
        assert path.read_bytes() == b"generation one"


def test_single_object_named_exactly_is_one_entry_by_base_name(gcs) -> None:
    body = b"just one object\n"
    blob = gcs.put("models/v1/weights.bin", body)
    gcs.put("models/v1/other.bin", b"other")

    [entry] = track(gcs.url("models/v1/weights.bin"))["data"].fetch_files_list()

    assert entry.file_path == "weights.bin"
    assert entry.file_hash == hashlib.md5(body).hexdigest()
    assert entry.metadata["generation"] == str(blob.generation)
    assert entry.metadata["file_path"] == f"gs://{gcs.name}/models/v1/weights.bin"


def test_prefix_is_a_directory_boundary(gcs) -> None:
    gcs.put("data/train/x", b"train x")
    gcs.put("data/tr/y", b"tr y")
    gcs.put("data/trx", b"sibling object, not under data/tr/")

    files = files_by_path(track(gcs.url("data/tr")))

    assert set(files) == {"y"}
    assert files["y"].metadata["file_path"] == f"gs://{gcs.name}/data/tr/y"


def test_an_object_that_is_also_a_folder_is_tracked_as_named_with_a_warning(
    gcs, cli, tmp_path: Path
) -> None:
    check_an_object_that_is_also_a_folder_is_tracked_as_named(gcs, cli, tmp_path)


def test_names_holding_wildcard_characters_are_tracked_as_named(gcs, cli, tmp_path: Path) -> None:
    check_names_holding_wildcard_characters_are_tracked_as_named(gcs, cli, tmp_path)


def test_prefix_matching_only_a_longer_name_is_refused(gcs, cli, tmp_path: Path) -> None:
    gcs.put("data/train/x", b"train x")
    make_local_store(cli, tmp_path)
    before = store_counts()

    result = cli("--project", "ml/cls", "track", "data", gcs.url("data/tr"))

    message = assert_one_line_refusal(result)
    assert "data/tr" in message
    assert store_counts() == before

    run = artifactfs.init_run(project="ml/cls")  # creating the run is not the refused step
    before = store_counts()
    with pytest.raises(artifactfs.ArtifactfsError, match="data/tr"):
        run["data"].track_files(gcs.url("data/tr"))
    assert store_counts() == before


def test_folder_placeholders_skipped_empty_objects_kept(gcs, tmp_path: Path) -> None:
    gcs.put("ds/", b"")
    gcs.put("ds/sub/", b"")
    gcs.put("ds/sub/empty.txt", b"")
    gcs.put("ds/full.txt", b"content")

    run = track(gcs.url("ds"))
    files = files_by_path(run)

    assert set(files) == {"sub/empty.txt", "full.txt"}
    assert files["sub/empty.txt"].size == 0
    assert files["sub/empty.txt"].file_hash == hashlib.md5(b"").hexdigest()

    dest = tmp_path / "out"
    run["data"].download(destination=str(dest))
    assert read_tree(dest) == {"sub/empty.txt": b"", "full.txt": b"content"}


def test_whole_bucket_and_special_character_names(gcs, cli, tmp_path: Path) -> None:
    bodies = {
        "top.txt": b"top",
        "dir with spaces/ü nicode + plus.txt": b"special",
        "dir with spaces/a=b&c%20d?.csv": b"x=1",
    }
    blobs = {name: gcs.put(name, body) for name, body in bodies.items()}

    result = cli("--project", "ml/cls", "track", "data", f"gs://{gcs.name}")
    assert result.returncode == 0, result.stderr
    run_id = result.last_line
    files = files_by_path(artifactfs.init_run(with_id=run_id, mode="read-only"))
    assert set(files) == set(bodies)
    for name, body in bodies.items():
        assert files[name].file_hash == hashlib.md5(body).hexdigest()
        assert files[name].metadata["generation"] == str(blobs[name].generation)
        assert files[name].metadata["file_path"] == f"gs://{gcs.name}/{name}"

    dest = tmp_path / "out"
    downloaded = cli("download", run_id, "data", str(dest))
    assert downloaded.returncode == 0, downloaded.stderr
    assert read_tree(dest) == bodies
    assert cli("verify", run_id).returncode == 0


def test_names_that_would_escape_the_tree_are_refused(gcs, cli, tmp_path: Path) -> None:
    # An empty segment ('ds//x' -> '/x', absolute). The emulator cannot store a '..' name
    # (it drops the connection), so that case is covered by the S3 tests only.
    name = "ds//double.txt"
    gcs.put("ds/fine.txt", b"fine")
    gcs.put(name, b"bad")
    assert name in {b.name for b in gcs.client.list_blobs(gcs.name, prefix="ds/")}
    make_local_store(cli, tmp_path)
    before = store_counts()

    result = cli("--project", "ml/cls", "track", "data", gcs.url("ds"))

    message = assert_one_line_refusal(result)
    assert name[len("ds/") :] in message
    assert store_counts() == before


def test_wildcards_refused(gcs, cli, tmp_path: Path) -> None:
    gcs.put("ds/a.txt", b"a")
    make_local_store(cli, tmp_path)
    before = store_counts()
    result = cli("--project", "ml/cls", "track", "data", gcs.url("ds/*.txt"))
    message = assert_one_line_refusal(result)
    assert "wildcard" in message.lower()
    assert store_counts() == before


def test_nonexistent_bucket_refused(gcs, cli, tmp_path: Path) -> None:
    make_local_store(cli, tmp_path)
    before = store_counts()

    result = cli("--project", "p", "track", "f", "gs://no-such-bucket-artifactfs-test/data")

    message = assert_one_line_refusal(result)
    assert "no-such-bucket-artifactfs-test" in message
    assert store_counts() == before


# -- download ---------------------------------------------------------------------------------


def test_download_api_and_cli_reproduce_every_byte(gcs, cli, tmp_path: Path) -> None:
    bodies = {
        "root/a.txt": b"alpha\n",
        "root/nested/b.bin": os.urandom(300_000),
        "root/nested/deeper/c.json": b'{"k": [1, 2, 3]}',
        "root/nested/deeper/still/d": os.urandom(17),
        "root/large.bin": os.urandom(3 * 1024 * 1024 + 123),  # several read chunks
        # A whole 8 MiB chunk, more than the sockets hold: the emulator, which answers one
        # request at a time, never took the metadata request sent while its body waited.
        "root/larger.bin": os.urandom(9 * 1024 * 1024 + 7),
    }
    for name, body in bodies.items():
        gcs.put(name, body)
    expected = {name[len("root/") :]: body for name, body in bodies.items()}

    run = track(gcs.url("root"))

    api_dest = tmp_path / "api"
    run["data"].download(destination=str(api_dest))
    assert read_tree(api_dest) == expected

    cli_dest = tmp_path / "cli"
    result = cli("download", run.id, "data", str(cli_dest))
    assert result.returncode == 0, result.stderr
    assert read_tree(cli_dest) == expected

    verified = cli("verify", run.id)
    assert verified.returncode == 0, (verified.stdout, verified.stderr)


# -- sources that changed after tracking ------------------------------------------------------


@pytest.mark.parametrize("change", ["overwrite", "delete"])
def test_changed_object_fails_download_and_verify_by_name(
    gcs, cli, tmp_path: Path, change: str
) -> None:
    gcs.put("ds/keep.txt", b"unchanged")
    gcs.put("ds/sub/victim.txt", b"tracked bytes")
    run = track(gcs.url("ds"))

    if change == "overwrite":
        gcs.put("ds/sub/victim.txt", b"changed bytes")  # same size, different content
    else:
        gcs.client.bucket(gcs.name).blob("ds/sub/victim.txt").delete()

    dest = tmp_path / "out"
    result = cli("download", run.id, "data", str(dest))
    message = assert_one_line_refusal(result, code=1)
    assert f"gs://{gcs.name}/ds/sub/victim.txt" in message
    assert not (dest / "sub" / "victim.txt").exists()
    assert leftovers(dest) == []

    verified = cli("verify", run.id)
    assert verified.returncode == 1, (verified.stdout, verified.stderr)
    assert "Traceback" not in verified.stderr
    assert "sub/victim.txt" in verified.stdout + verified.stderr
    assert "keep.txt" not in verified.stdout + verified.stderr

    with pytest.raises(artifactfs.CheckFailedError, match=r"victim\.txt"):
        run["data"].download(destination=str(tmp_path / "api"))
    assert not (tmp_path / "api" / "sub" / "victim.txt").exists()


@pytest.mark.parametrize(
    ("key_file", "says"),
    [
        ("missing.json", "which does not exist"),
        ("not-a-key.json", "which is not a valid key file: "),
        ("a-directory", "which cannot be read: Is a directory"),
    ],
)
def test_a_key_file_that_cannot_be_used_is_named_with_what_is_wrong_with_it(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key_file: str, says: str
) -> None:
    """GOOGLE_APPLICATION_CREDENTIALS set to a file that is missing or no key file was told
    "no GCS credentials found: set GOOGLE_APPLICATION_CREDENTIALS", though it was set."""
    make_local_store(cli, tmp_path)
    before = store_counts()
    (tmp_path / "not-a-key.json").write_text('{"type": "service_account"}')
    (tmp_path / "a-directory").mkdir()
    path = tmp_path / key_file
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # no metadata server to ask
    refused = assert_one_line_refusal(cli("--project", "p", "track", "f", "gs://bkt/k"))
    assert f"GOOGLE_APPLICATION_CREDENTIALS names {path}, {says}" in refused, refused
    assert "no GCS credentials found" not in refused
    assert store_counts() == before
