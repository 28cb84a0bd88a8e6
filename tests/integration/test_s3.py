"""artifactfs against a real S3 server (moto_server on 127.0.0.1): what a user checks.

Hashes equal the ETags S3 reports, downloads reproduce every byte, a changed or deleted object is
reported by name, and every refusal is one line on stderr with exit 2 and nothing recorded.
"""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import timezone
from pathlib import Path
from typing import Any

import pytest

import artifactfs
from artifactfs.sources import reset_sources
from tests.support.bucket_tracking import (
    check_an_object_that_is_also_a_folder_is_tracked_as_named,
    check_names_holding_wildcard_characters_are_tracked_as_named,
)
from tests.support.faultproxy import fault_proxy
from tests.support.mounts import artifact_args, mounted
from tests.support.stores import make_local_store, store_counts

pytestmark = pytest.mark.s3

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
EMPTY_MD5 = hashlib.md5(b"").hexdigest()


# -- helpers ----------------------------------------------------------------------------------


def etag_of(response: dict[str, Any]) -> str:
    return response["ETag"].strip('"')


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


def test_prefix_entries_carry_etag_size_type_and_location(s3) -> None:
    bodies = {
        "datasets/train/a.csv": b"a,b\n1,2\n",
        "datasets/train/deep/b.bin": bytes(range(256)) * 40,
        "datasets/readme.txt": b"hello s3\n",
    }
    puts = {key: s3.put(key, body) for key, body in bodies.items()}

    run = track(s3.url("datasets"))
    files = files_by_path(run)

    assert set(files) == {"train/a.csv", "train/deep/b.bin", "readme.txt"}
    for key, body in bodies.items():
        entry = files[key[len("datasets/") :]]
        head = s3.client.head_object(Bucket=s3.name, Key=key)
        assert entry.file_hash == etag_of(puts[key]) == etag_of(head)
        assert entry.file_hash == hashlib.md5(body).hexdigest()
        assert entry.size == len(body)
        assert entry.type == "S3"
        assert entry.metadata["file_path"] == f"s3://{s3.name}/{key}"
        assert entry.metadata["location"] == f"s3://{s3.name}/{key}"
        assert TIMESTAMP.match(entry.metadata["last_modified"])
        expected_time = head["LastModified"].astimezone(timezone.utc)
        assert entry.metadata["last_modified"] == expected_time.strftime("%Y-%m-%d %H:%M:%S")
        assert "version_id" not in entry.metadata  # unversioned bucket


def test_trailing_slash_prefix_same_as_without(s3) -> None:
    s3.put("p/x.txt", b"x")
    s3.put("p/y/z.txt", b"z")
    with_slash = files_by_path(track(s3.url("p/")))
    without = files_by_path(track(s3.url("p")))
    assert set(with_slash) == set(without) == {"x.txt", "y/z.txt"}


def test_single_object_named_exactly_is_one_entry_by_base_name(s3) -> None:
    body = b"just one object\n"
    put = s3.put("models/v1/weights.bin", body)
    s3.put("models/v1/other.bin", b"other")

    run = track(s3.url("models/v1/weights.bin"))
    files = run["data"].fetch_files_list()

    assert len(files) == 1
    [entry] = files
    assert entry.file_path == "weights.bin"
    assert entry.file_hash == etag_of(put) == hashlib.md5(body).hexdigest()
    assert entry.size == len(body)
    assert entry.metadata["file_path"] == f"s3://{s3.name}/models/v1/weights.bin"


def test_prefix_is_a_directory_boundary(s3) -> None:
    s3.put("data/train/x", b"train x")
    s3.put("data/tr/y", b"tr y")
    s3.put("data/trx", b"sibling object, not under data/tr/")

    files = files_by_path(track(s3.url("data/tr")))

    assert set(files) == {"y"}
    assert files["y"].metadata["file_path"] == f"s3://{s3.name}/data/tr/y"


def test_an_object_that_is_also_a_folder_is_tracked_as_named_with_a_warning(
    s3, cli, tmp_path: Path
) -> None:
    check_an_object_that_is_also_a_folder_is_tracked_as_named(s3, cli, tmp_path)


def test_names_holding_wildcard_characters_are_tracked_as_named(s3, cli, tmp_path: Path) -> None:
    check_names_holding_wildcard_characters_are_tracked_as_named(s3, cli, tmp_path)


def test_prefix_matching_only_a_longer_name_is_refused(s3, cli, tmp_path: Path) -> None:
    s3.put("data/train/x", b"train x")
    make_local_store(cli, tmp_path)
    before = store_counts()

    result = cli("--project", "ml/cls", "track", "data", s3.url("data/tr"))

    message = assert_one_line_refusal(result)
    assert "data/tr" in message
    assert store_counts() == before

    run = artifactfs.init_run(project="ml/cls")  # creating the run is not the refused step
    before = store_counts()
    with pytest.raises(artifactfs.ArtifactfsError, match="data/tr"):
        run["data"].track_files(s3.url("data/tr"))
    assert store_counts() == before
    with pytest.raises(artifactfs.NotFoundError):
        run["data"].fetch_files_list()


def test_folder_markers_skipped_empty_objects_kept(s3) -> None:
    s3.put("ds/", b"")
    s3.put("ds/sub/", b"")
    s3.put("ds/sub/empty.txt", b"")
    s3.put("ds/full.txt", b"content")

    files = files_by_path(track(s3.url("ds")))

    assert set(files) == {"sub/empty.txt", "full.txt"}
    assert files["sub/empty.txt"].size == 0
    assert files["sub/empty.txt"].file_hash == EMPTY_MD5


def test_empty_object_downloads_as_empty_file(s3, tmp_path: Path) -> None:
    s3.put("ds/empty.txt", b"")
    s3.put("ds/full.txt", b"content")
    run = track(s3.url("ds"))
    dest = tmp_path / "out"
    run["data"].download(destination=str(dest))
    assert read_tree(dest) == {"empty.txt": b"", "full.txt": b"content"}


def test_pagination_2500_objects_all_tracked(s3, s3_endpoint) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=s3_endpoint, config=Config(max_pool_connections=16))
    keys = [f"many/{i // 100:02d}/obj-{i:05d}.txt" for i in range(2500)]

    def put(key: str) -> None:
        client.put_object(Bucket=s3.name, Key=key, Body=key.encode())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, keys))

    files = files_by_path(track(s3.url("many")))

    assert len(files) == 2500
    assert set(files) == {key[len("many/") :] for key in keys}
    sample = files["07/obj-00742.txt"]
    assert sample.file_hash == hashlib.md5(b"many/07/obj-00742.txt").hexdigest()
    assert sample.size == len(b"many/07/obj-00742.txt")


def test_whole_bucket_and_special_character_keys(s3, cli, tmp_path: Path) -> None:
    bodies = {
        "top.txt": b"top",
        "dir with spaces/ü nicode + plus.txt": b"special",
        "dir with spaces/a=b&c%20d.csv": b"x=1",
    }
    for key, body in bodies.items():
        s3.put(key, body)

    result = cli("--project", "ml/cls", "track", "data", f"s3://{s3.name}")
    assert result.returncode == 0, result.stderr
    run_id = result.last_line
    run = artifactfs.init_run(with_id=run_id, mode="read-only")
    files = files_by_path(run)
    assert set(files) == set(bodies)
    for key, body in bodies.items():
        assert files[key].file_hash == hashlib.md5(body).hexdigest()
        assert files[key].metadata["file_path"] == f"s3://{s3.name}/{key}"

    dest = tmp_path / "out"
    downloaded = cli("download", run_id, "data", str(dest))
    assert downloaded.returncode == 0, downloaded.stderr
    assert read_tree(dest) == bodies
    assert cli("verify", run_id).returncode == 0


@pytest.mark.parametrize("key", ["ds/../evil.txt", "ds//double.txt"])
def test_keys_that_would_escape_the_tree_are_refused(s3, cli, tmp_path: Path, key: str) -> None:
    s3.put("ds/fine.txt", b"fine")
    s3.put(key, b"bad")
    listed = s3.client.list_objects_v2(Bucket=s3.name, Prefix="ds/")
    assert key in {o["Key"] for o in listed["Contents"]}  # the server kept the key as is
    make_local_store(cli, tmp_path)
    before = store_counts()

    result = cli("--project", "ml/cls", "track", "data", s3.url("ds"))

    message = assert_one_line_refusal(result)
    assert key[len("ds/") :] in message
    assert store_counts() == before


def test_wildcards_refused(s3, cli, tmp_path: Path) -> None:
    s3.put("ds/a.txt", b"a")
    make_local_store(cli, tmp_path)
    before = store_counts()
    result = cli("--project", "ml/cls", "track", "data", s3.url("ds/*.txt"))
    message = assert_one_line_refusal(result)
    assert "wildcard" in message.lower()
    assert store_counts() == before


# -- versioned buckets and multipart uploads --------------------------------------------------


def enable_versioning(s3: Any) -> None:
    s3.client.put_bucket_versioning(Bucket=s3.name, VersioningConfiguration={"Status": "Enabled"})


def test_versioned_bucket_tracks_latest_versions_only(s3) -> None:
    enable_versioning(s3)
    s3.put("v/a.txt", b"a, old")
    latest_a = s3.put("v/a.txt", b"a, newer")
    s3.put("v/gone.txt", b"deleted later")
    s3.client.delete_object(Bucket=s3.name, Key="v/gone.txt")
    b = s3.put("v/b.txt", b"b")

    files = files_by_path(track(s3.url("v")))

    assert set(files) == {"a.txt", "b.txt"}
    assert files["a.txt"].file_hash == etag_of(latest_a) == hashlib.md5(b"a, newer").hexdigest()
    assert files["a.txt"].metadata["version_id"] == latest_a["VersionId"]
    assert files["b.txt"].metadata["version_id"] == b["VersionId"]

    [single] = track(s3.url("v/a.txt"))["data"].fetch_files_list()
    assert single.file_path == "a.txt"
    assert single.metadata["version_id"] == latest_a["VersionId"]
    assert single.file_hash == etag_of(latest_a)


def test_the_mount_shows_which_version_of_an_object_was_tracked(s3, tmp_path: Path) -> None:
    """The version id is what fetches those bytes elsewhere (`aws s3api get-object
    --version-id`): in the entry's metadata, but no attribute of the mount showed it."""
    enable_versioning(s3)
    tracked = s3.put("m/a.txt", b"a as tracked")
    run = track(s3.url("m"))
    s3.put("m/a.txt", b"a, overwritten since")
    cache = tmp_path / "cache"
    with mounted(tmp_path / "mnt", *artifact_args(run.id, "data", cache)) as mount:
        path = mount.path / "a.txt"
        assert os.getxattr(path, "user.artifactfs.version_id") == tracked["VersionId"].encode()
        assert "user.artifactfs.version_id" in os.listxattr(path)
        assert path.read_bytes() == b"a as tracked"  # that version, not the latest


@pytest.mark.parametrize("denied", [("versioning",), ("versioning", "versions")])
def test_a_versioned_bucket_that_will_not_say_so_still_pins_versions_where_it_can(
    s3: Any, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, denied: tuple[str, ...]
) -> None:
    """GetBucketVersioning denied (403) on a versioned bucket: `track` recorded no version_id,
    silently. Now the object's HEAD pins a single object, and the latest versions listed pin
    a prefix; only where listing versions is denied too does a prefix go by ETags alone."""
    enable_versioning(s3)
    s3.put("v/a.txt", b"a, old")
    latest_a = s3.put("v/a.txt", b"a, newer")
    b = s3.put("v/b.txt", b"b")
    with fault_proxy(s3_endpoint) as proxy:
        for request in denied:  # GET /bucket?versioning, GET /bucket?versions&prefix=...
            proxy.add("status", f"GET /{s3.name}?{request}", status=403)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        reset_sources()
        [single] = track(s3.url("v/a.txt"))["data"].fetch_files_list()
        files = files_by_path(track(s3.url("v")))
        assert proxy.faults_applied("status", f"GET /{s3.name}?versioning") == 2
    assert single.metadata["version_id"] == latest_a["VersionId"]
    assert set(files) == {"a.txt", "b.txt"}
    assert files["a.txt"].file_hash == etag_of(latest_a)
    if "versions" in denied:
        assert all("version_id" not in entry.metadata for entry in files.values())
    else:
        assert files["a.txt"].metadata["version_id"] == latest_a["VersionId"]
        assert files["b.txt"].metadata["version_id"] == b["VersionId"]


def test_versioned_bucket_pins_version_and_download_returns_original(
    s3, cli, tmp_path: Path
) -> None:
    enable_versioning(s3)
    original = b"original bytes v1\n" * 100
    put = s3.put("v/model.bin", original)
    assert put.get("VersionId")

    run = track(s3.url("v"))
    [entry] = run["data"].fetch_files_list()
    assert entry.metadata["version_id"] == put["VersionId"]
    assert entry.file_hash == etag_of(put)

    overwrite = s3.put("v/model.bin", b"NEW bytes, v2\n" * 77)
    assert overwrite["VersionId"] != put["VersionId"]

    dest = tmp_path / "api"
    run["data"].download(destination=str(dest))
    assert (dest / "model.bin").read_bytes() == original

    result = cli("download", run.id, "data", str(tmp_path / "cli"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cli" / "model.bin").read_bytes() == original

    verified = cli("verify", run.id)
    assert verified.returncode == 0, (verified.stdout, verified.stderr)

    # Even once the key is deleted (a delete marker), the pinned version is still the data.
    s3.client.delete_object(Bucket=s3.name, Key="v/model.bin")
    after_delete = tmp_path / "after-delete"
    run["data"].download(destination=str(after_delete))
    assert (after_delete / "model.bin").read_bytes() == original


def test_objects_encrypted_with_a_kms_key_read_back_through_download_and_the_mount(
    s3, s3_endpoint: str, cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS gives an object encrypted with SSE-KMS an ETag that looks like an MD5 and is none
    of its bytes (the proxy does so over moto): every read of one failed its content check,
    while `verify` said it was fine. The answers say `aws:kms`; those objects are checked by
    their ETag and size. Other objects through the same proxy are still checked by MD5."""
    bodies = {
        "kms/small.txt": b"secret rows\n",  # read whole, prefetched on the mount's loop
        "kms/sub/many.bin": os.urandom(20 << 20),  # chunks, checked whole before serving
    }
    for key, body in bodies.items():
        s3.client.put_object(Bucket=s3.name, Key=key, Body=body, ServerSideEncryption="aws:kms")
    s3.put("plain/a.txt", b"plain bytes")
    expected = {key[len("kms/") :]: body for key, body in bodies.items()}
    with fault_proxy(s3_endpoint) as proxy:
        proxy.hide_md5_etags = True
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        reset_sources()
        run = track(s3.url("kms"))
        small = files_by_path(run)["small.txt"]
        assert small.file_hash != hashlib.md5(bodies["kms/small.txt"]).hexdigest()  # as AWS
        run["data"].download(destination=str(tmp_path / "downloaded"))
        assert read_tree(tmp_path / "downloaded") == expected
        # New processes, which have seen no answer about them: their bytes come from the
        # cache, into a DEST that holds them already, then into a new one.
        for dest, said in (("downloaded", "0 file(s) written, 2"), ("again", "2 file(s) written")):
            again = cli("download", run.id, "data", str(tmp_path / dest))
            assert again.returncode == 0 and said in again.stdout, again
            assert read_tree(tmp_path / dest) == expected
        for _ in ("fetched", "from the cache kept"):  # a new daemon knows nothing of them
            with mounted(
                tmp_path / "mnt", *artifact_args(run.id, "data", tmp_path / "cache")
            ) as mount:
                assert read_tree(mount.path) == expected
        plain = track(s3.url("plain"))
        with pytest.raises(artifactfs.CheckFailedError, match="content hash is"):
            plain["data"].download(destination=str(tmp_path / "plain"))


def test_multipart_upload_etag_tracked_and_downloaded(s3, cli, tmp_path: Path) -> None:
    from boto3.s3.transfer import TransferConfig

    mb = 1024 * 1024
    body = os.urandom(11 * mb)
    source = tmp_path / "big.bin"
    source.write_bytes(body)
    s3.client.upload_file(
        str(source),
        s3.name,
        "big/big.bin",
        Config=TransferConfig(multipart_threshold=5 * mb, multipart_chunksize=5 * mb),
    )
    etag = etag_of(s3.client.head_object(Bucket=s3.name, Key="big/big.bin"))
    assert re.fullmatch(r"[0-9a-f]{32}-3", etag)

    run = track(s3.url("big"))
    [entry] = run["data"].fetch_files_list()
    assert entry.file_hash == etag
    assert entry.size == len(body)

    dest = tmp_path / "out"
    run["data"].download(destination=str(dest))
    assert (dest / "big.bin").read_bytes() == body

    result = cli("download", run.id, "data", str(tmp_path / "cli"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cli" / "big.bin").read_bytes() == body


# -- download ---------------------------------------------------------------------------------


def test_download_api_and_cli_reproduce_every_byte(s3, cli, tmp_path: Path) -> None:
    bodies = {
        "root/a.txt": b"alpha\n",
        "root/nested/b.bin": os.urandom(300_000),
        "root/nested/deeper/c.json": b'{"k": [1, 2, 3]}',
        "root/nested/deeper/still/d": os.urandom(17),
    }
    for key, body in bodies.items():
        s3.put(key, body)
    expected = {key[len("root/") :]: body for key, body in bodies.items()}

    run = track(s3.url("root"))

    api_dest = tmp_path / "api"
    run["data"].download(destination=str(api_dest))
    assert read_tree(api_dest) == expected

    cli_dest = tmp_path / "cli"
    result = cli("download", run.id, "data", str(cli_dest))
    assert result.returncode == 0, result.stderr
    assert read_tree(cli_dest) == expected


# -- sources that changed after tracking ------------------------------------------------------


@pytest.mark.parametrize("change", ["overwrite", "delete"])
def test_changed_object_fails_download_and_verify_by_name(
    s3, cli, tmp_path: Path, change: str
) -> None:
    s3.put("ds/keep.txt", b"unchanged")
    s3.put("ds/sub/victim.txt", b"tracked bytes")
    run = track(s3.url("ds"))

    if change == "overwrite":
        s3.put("ds/sub/victim.txt", b"changed bytes")  # same size, different content
    else:
        s3.client.delete_object(Bucket=s3.name, Key="ds/sub/victim.txt")

    dest = tmp_path / "out"
    result = cli("download", run.id, "data", str(dest))
    message = assert_one_line_refusal(result, code=1)
    assert f"s3://{s3.name}/ds/sub/victim.txt" in message
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


# -- refusals ---------------------------------------------------------------------------------


def test_missing_credentials_refused_naming_variable(
    s3, cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.put("ds/a.txt", b"a")
    make_local_store(cli, tmp_path)
    before = store_counts()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")

    result = cli("--project", "p", "track", "f", s3.url("ds"))

    message = assert_one_line_refusal(result)
    assert "AWS_ACCESS_KEY_ID" in message
    assert store_counts() == before


def test_nonexistent_bucket_refused(s3, cli, tmp_path: Path) -> None:
    make_local_store(cli, tmp_path)
    before = store_counts()

    result = cli("--project", "p", "track", "f", "s3://no-such-bucket-artifactfs-test/data")

    message = assert_one_line_refusal(result)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    assert message.endswith(
        f"no such S3 bucket: no-such-bucket-artifactfs-test at {endpoint} "
        "(is AWS_ENDPOINT_URL right?)"
    ), message
    assert store_counts() == before
