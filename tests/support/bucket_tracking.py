"""Checks of how `track` reads a bucket, the same for S3 and GCS (their fixtures' buckets both
have `put(key, body)` and `url(key)`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import artifactfs
from tests.support.stores import make_local_store


def check_an_object_that_is_also_a_folder_is_tracked_as_named(
    bucket: Any, cli: Any, tmp_path: Path
) -> None:
    """`amb/tr` names an object while `amb/tr/...` objects exist too: the object is tracked
    (as named), with a warning saying how to track the folder; `amb/tr/` tracks the folder;
    a folder marker alone (`amb/marker/`) is no folder, and no warning."""
    bucket.put("amb/tr", b"the object")
    bucket.put("amb/tr/x.bin", b"in the folder")
    bucket.put("amb/marker/", b"")
    bucket.put("amb/marker", b"only an object")
    make_local_store(cli, tmp_path)
    project = ("--project", "ml/amb")
    named = cli(*project, "track", "obj", bucket.url("amb/tr"))
    assert named.returncode == 0, named
    assert named.stderr.splitlines() == [
        f"artifactfs: warning: {bucket.url('amb/tr')} is an object and also a folder: tracked "
        f"the object; track {bucket.url('amb/tr')}/ for the folder"
    ], named.stderr
    run_id = named.last_line
    assert [e.file_path for e in artifactfs.init_run(run_id)["obj"].fetch_files_list()] == ["tr"]
    folder = cli(*project, "track", "--run", run_id, "dir", bucket.url("amb/tr/"))
    assert folder.returncode == 0 and folder.stderr == "", folder
    entries = artifactfs.init_run(run_id)["dir"].fetch_files_list()
    assert [e.file_path for e in entries] == ["x.bin"]
    alone = cli(*project, "track", "--run", run_id, "alone", bucket.url("amb/marker"))
    assert alone.returncode == 0 and alone.stderr == "", alone


def check_names_holding_wildcard_characters_are_tracked_as_named(
    bucket: Any, cli: Any, tmp_path: Path
) -> None:
    """Keys may hold `*`, `?` and `[`: a location naming such an object, or a prefix holding
    them, is tracked and read back byte for byte. They were refused as wildcards before any
    request; only a location where nothing is says so now."""
    bodies = {"wild/img[1].png": b"one", "wild/what?.txt": b"two", "wild/[2024]/a*.csv": b"3"}
    for key, body in bodies.items():
        bucket.put(key, body)
    make_local_store(cli, tmp_path)
    tracked = {"one": "wild/img[1].png", "two": "wild/what?.txt", "year": "wild/[2024]"}
    run_id = None
    for field, key in tracked.items():
        run_args = ("--run", run_id) if run_id else ()
        result = cli("--project", "ml/wild", "track", *run_args, field, bucket.url(key))
        assert result.returncode == 0 and result.stderr == "", result
        run_id = result.last_line
    run = artifactfs.init_run(run_id)
    expected = {"one": "img[1].png", "two": "what?.txt", "year": "a*.csv"}
    for field, name in expected.items():
        entries = run[field].fetch_files_list()
        assert [e.file_path for e in entries] == [name], entries
        run[field].download(str(tmp_path / field))
    assert (tmp_path / "one" / "img[1].png").read_bytes() == b"one"
    assert (tmp_path / "two" / "what?.txt").read_bytes() == b"two"
    assert (tmp_path / "year" / "a*.csv").read_bytes() == b"3"
    nothing = cli("--project", "ml/wild", "track", "none", bucket.url("wild/*.png"))
    assert nothing.returncode == 2, nothing
    assert nothing.stderr.strip() == (
        f"artifactfs: error: wildcards are not supported: {bucket.url('wild/*.png')!r}; "
        "name a prefix instead"
    ), nothing.stderr
