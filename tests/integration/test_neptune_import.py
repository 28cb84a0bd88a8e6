"""`artifactfs import-neptune`: exported runs come back with their ids, mountable and verifiable."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from artifactfs.store import Store
from tests.conftest import S3Bucket, make_tree
from tests.support.mounts import mounted

# Every test here runs against SQLite and against PostgreSQL, but those marked
# backend_independent (SQLite only: the backend plays no part in what they check).
pytestmark = pytest.mark.store_backends

ALICE = "/home/alice/project/datasets"


def wire_entry(path: str, file_hash: str, kind: str, size: int, **metadata: str) -> dict:
    return {
        "filePath": path,
        "fileHash": file_hash,
        "type": kind,
        "size": size,
        "metadata": [{"key": k, "value": v} for k, v in metadata.items()],
    }


def local_entry(file_path: str, body: bytes) -> dict:
    return wire_entry(
        file_path,
        hashlib.sha1(body).hexdigest(),
        "Local",
        len(body),
        file_path=f"file://{ALICE}/{file_path}",
        last_modified="2022-09-30 10:50:40",
    )


def write_export(root: Path, run_path: str, entries: list[dict] | str) -> Path:
    target = root / run_path / "files_list.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(entries if isinstance(entries, str) else json.dumps(entries))
    return target


LOCAL_FILES = {
    "train/sample.csv": b"a,b\n1,2\n",
    "train/more.csv": b"x" * 5000,
    "test/sample.csv": b"c,d\n3,4\n",
    "empty.txt": b"",
}


@pytest.fixture
def export(tmp_path: Path, s3: S3Bucket) -> dict:
    """Two projects, several runs, nested fields, Local and S3 entries, data moved since."""
    data = make_tree(tmp_path / "data", LOCAL_FILES)  # recorded under ALICE, lives here
    images = {"images/0001.png": b"\x89PNG" + bytes(range(200)), "images/0002.png": b"\x89PNG2"}
    s3_entries = []
    for key, body in images.items():
        etag = s3.put(key, body)["ETag"].strip('"')
        url = f"s3://ml-team-data/{key}"  # recorded bucket; the data now lives in s3.name
        s3_entries.append(
            wire_entry(
                key, etag, "S3", len(body), location=url, last_modified="2022-09-30 10:51:02"
            )
        )
    root = tmp_path / "export"
    write_export(
        root,
        "ml-team/classification/CLS-45/data_versions",
        [local_entry(p, b) for p, b in LOCAL_FILES.items() if p.startswith("train/")] + s3_entries,
    )
    write_export(
        root,
        "ml-team/classification/CLS-7/datasets/test",
        [local_entry("test/sample.csv", LOCAL_FILES["test/sample.csv"])],
    )
    write_export(
        root,
        "ml-team/detection/DET-3/data",
        [
            local_entry("empty.txt", b""),
            local_entry("train/sample.csv", LOCAL_FILES["train/sample.csv"]),
        ],
    )
    rebases = [f"--rebase={ALICE}={data}", f"--rebase=s3://ml-team-data=s3://{s3.name}"]
    return {"root": root, "data": data, "images": images, "rebases": rebases, "bucket": s3}


def test_import_mount_verify_and_detect_a_change(cli, tmp_path: Path, export: dict) -> None:
    result = cli("import-neptune", str(export["root"]), *export["rebases"])
    assert result.returncode == 0, result.stderr
    assert "3 field(s) imported" in result.stdout

    runs = cli("runs").stdout
    for run_id in ("CLS-45", "CLS-7", "DET-3"):
        assert run_id in runs
    # New runs continue after the highest imported number.
    new = cli("--project", "ml-team/classification", "track", "x", str(export["data"]))
    assert new.last_line == "CLS-46"

    with mounted(tmp_path / "mnt", "--cache-dir", str(tmp_path / "cache")) as mount:
        base = mount.path / "ml-team" / "classification"
        for rel in ("train/sample.csv", "train/more.csv"):
            assert (base / "CLS-45/data_versions" / rel).read_bytes() == LOCAL_FILES[rel]
        for rel, body in export["images"].items():
            assert (base / "CLS-45/data_versions" / rel).read_bytes() == body
        assert (base / "CLS-7/datasets/test/test/sample.csv").read_bytes() == LOCAL_FILES[
            "test/sample.csv"
        ]
        det = mount.path / "ml-team" / "detection" / "DET-3" / "data"
        assert (det / "empty.txt").read_bytes() == b""
        # Imported hashes are kept as recorded.
        assert mount.xattr(
            "ml-team/classification/CLS-45/data_versions/train/more.csv", "file_hash"
        ) == (hashlib.sha1(LOCAL_FILES["train/more.csv"]).hexdigest())

    for run_id in ("CLS-45", "CLS-7", "DET-3"):
        verified = cli("verify", run_id)
        assert verified.returncode == 0, verified.stdout + verified.stderr

    (export["data"] / "train" / "more.csv").write_bytes(b"y" * 5000)
    changed = cli("verify", "CLS-45")
    assert changed.returncode == 1
    assert "train/more.csv" in changed.stdout
    assert "train/sample.csv" not in changed.stdout


def test_importing_twice_changes_nothing_and_says_so(cli, export: dict) -> None:
    assert cli("import-neptune", str(export["root"]), *export["rebases"]).returncode == 0
    before = Store().counts()
    again = cli("import-neptune", str(export["root"]), *export["rebases"])
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert again.stdout.count("unchanged ") == 3
    assert Store().counts() == before


def test_dry_run_writes_nothing(cli, export: dict) -> None:
    cli("--project", "other/p", "track", "f", str(export["data"]), check=True)
    before = Store().counts()
    result = cli("import-neptune", "--dry-run", str(export["root"]), *export["rebases"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("would import ") == 3
    assert Store().counts() == before


def test_dry_run_says_what_the_import_would_do(cli, export: dict) -> None:
    """Fields `datasets` beside `datasets/test` (a field cannot be a namespace of another): the
    dry run reports the skip that the import makes, with the same output and exit status."""
    write_export(
        export["root"],
        "ml-team/classification/CLS-7/datasets",
        [local_entry("train/sample.csv", LOCAL_FILES["train/sample.csv"])],
    )
    dry = cli("import-neptune", "--dry-run", str(export["root"]), *export["rebases"])
    real = cli("import-neptune", str(export["root"]), *export["rebases"])
    assert (dry.returncode, real.returncode) == (1, 1), (dry, real)
    assert "a field cannot be a namespace of another" in dry.stderr
    for dry_text, real_text in ((dry.stdout, real.stdout), (dry.stderr, real.stderr)):
        assert dry_text.replace("would import", "imported") == real_text


def test_dry_run_of_one_run_exported_in_two_projects_says_what_the_import_does(
    cli, export: dict
) -> None:
    """Run CLS-45 under two projects: the import makes it in the first and skips it in the
    second (a run belongs to one project); so does the dry run's report."""
    write_export(
        export["root"],
        "ml-team/segmentation/CLS-45/other",
        [local_entry("test/sample.csv", LOCAL_FILES["test/sample.csv"])],
    )
    dry = cli("import-neptune", "--dry-run", str(export["root"]), *export["rebases"])
    real = cli("import-neptune", str(export["root"]), *export["rebases"])
    assert "exists in project ml-team/classification" in real.stderr, real
    for dry_text, real_text in ((dry.stdout, real.stdout), (dry.stderr, real.stderr)):
        assert dry_text.replace("would import", "imported") == real_text
    assert dry.returncode == real.returncode


def test_a_remote_file_of_unknown_size_downloads_whole(cli, tmp_path: Path, s3: S3Bucket) -> None:
    """Neptune's entries may have no size: such a file is downloaded whole, not as an empty
    file reported written (the reader cuts files into chunks by their size)."""
    body = bytes(range(256)) * 5000
    etag = s3.put("unsized/big.bin", body)["ETag"].strip('"')
    entry = wire_entry("big.bin", etag, "S3", 0, location=s3.url("unsized/big.bin"))
    entry["size"] = None
    write_export(tmp_path / "export", "ml/p/P-3/data", [entry])
    assert cli("import-neptune", str(tmp_path / "export")).returncode == 0
    result = cli("download", "P-3", "data", str(tmp_path / "out"))
    assert result.returncode == 0, result
    assert (tmp_path / "out" / "big.bin").read_bytes() == body


def test_files_of_unknown_size_read_whole_through_the_mount(
    cli, tmp_path: Path, s3: S3Bucket
) -> None:
    """Entries without a size, local and remote: the mount shows the size their source says
    (checked to be the tracked bytes) in stat and in the `size` xattr, and reads them whole,
    not as empty files. One whose source is gone shows 0 and an empty `size`."""
    local_body = b"local, of unknown size\n" * 100
    local = make_tree(tmp_path / "data", {"local.txt": local_body}) / "local.txt"
    remote_body = bytes(range(256)) * 3000
    etag = s3.put("unsized/remote.bin", remote_body)["ETag"].strip('"')
    entries = [
        wire_entry(
            "local.txt",
            hashlib.sha1(local_body).hexdigest(),
            "Local",
            0,
            file_path=f"file://{local}",
        ),
        wire_entry("gone.txt", "0" * 40, "Local", 0, file_path=f"file://{tmp_path}/gone.txt"),
        wire_entry("remote.bin", etag, "S3", 0, location=s3.url("unsized/remote.bin")),
    ]
    for entry in entries:
        entry["size"] = None
    write_export(tmp_path / "export", "ml/p/P-4/data", entries)
    assert cli("import-neptune", str(tmp_path / "export")).returncode == 0
    with mounted(tmp_path / "mnt", "--cache-dir", str(tmp_path / "cache")) as mount:
        base = mount.path / "ml" / "p" / "P-4" / "data"
        listed = {p.name: p.stat().st_size for p in base.iterdir()}
        sizes = {"local.txt": len(local_body), "remote.bin": len(remote_body)}
        assert listed == {**sizes, "gone.txt": 0}
        for name, size in sizes.items():
            assert mount.xattr(f"ml/p/P-4/data/{name}", "size") == str(size), name
            shown = subprocess.run(
                ["getfattr", "--only-values", "-n", "user.artifactfs.size", str(base / name)],
                capture_output=True,
                text=True,
            )
            assert (shown.returncode, shown.stdout) == (0, str(size)), shown
        assert mount.xattr("ml/p/P-4/data/gone.txt", "size") == ""
        assert (base / "local.txt").read_bytes() == local_body
        assert (base / "remote.bin").read_bytes() == remote_body
        with open(base / "remote.bin", "rb") as handle:
            handle.seek(100_000)
            assert handle.read(5000) == remote_body[100_000:105_000]


def test_conflicting_run_is_reported_and_not_overwritten(cli, export: dict) -> None:
    assert cli("import-neptune", str(export["root"]), *export["rebases"]).returncode == 0
    hash_before = cli("hash", "CLS-45", "data_versions").last_line
    # The same run id with other content: without the rebase, other source URLs.
    result = cli("import-neptune", str(export["root"]))
    assert result.returncode == 1
    assert "skipped ml-team/classification/CLS-45/data_versions" in result.stderr
    assert "not overwritten" in result.stderr
    assert cli("hash", "CLS-45", "data_versions").last_line == hash_before
    assert cli("files", "CLS-45", "data_versions", "--json").stdout.count(str(export["data"])) == 2


BAD_FILES = {
    "malformed JSON": "[{not json",
    "not an array": '{"filePath": "a"}',
    "size of the wrong type": [{**local_entry("a.csv", b"a"), "size": "big"}],
    "unknown type": [{**local_entry("a.csv", b"a"), "type": "FTP"}],
    "metadata not a list": [{**local_entry("a.csv", b"a"), "metadata": {"file_path": "x"}}],
    "negative size": [{**local_entry("a.csv", b"a"), "size": -1}],
    "path escaping": [local_entry("../escape.csv", b"a")],
    "absolute path": [{**local_entry("a.csv", b"a"), "filePath": "/etc/passwd"}],
    "empty segment": [{**local_entry("a.csv", b"a"), "filePath": "a//b.csv"}],
    "file and directory": [local_entry("x", b"a"), local_entry("x/y", b"b")],
}


@pytest.mark.backend_independent
@pytest.mark.parametrize("problem", list(BAD_FILES))
def test_bad_export_files_are_reported_and_the_rest_imported(
    cli, tmp_path: Path, problem: str
) -> None:
    root = tmp_path / "export"
    write_export(root, "ml/good/GD-1/data", [local_entry("a.csv", b"a")])
    bad = write_export(root, "ml/bad/BD-9/data", BAD_FILES[problem])
    result = cli("import-neptune", str(root))
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    failure_lines = [line for line in result.stderr.splitlines() if line.startswith("failed ")]
    assert len(failure_lines) == 1
    assert str(bad) in failure_lines[0]
    assert "1 field(s) imported" in result.stderr
    runs = cli("runs").stdout
    assert "GD-1" in runs
    assert "BD-9" not in runs


@pytest.mark.backend_independent
def test_bad_arguments_are_one_line_errors(cli, tmp_path: Path) -> None:
    for args in (
        ["import-neptune", str(tmp_path / "missing")],
        ["import-neptune", str(tmp_path), "--rebase", "no-equals-sign"],
    ):
        result = cli(*args)
        assert result.returncode == 2, result
        assert len(result.stderr.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("import-neptune", str(empty))
    assert result.returncode == 2
    assert "no files_list.json" in result.stderr
