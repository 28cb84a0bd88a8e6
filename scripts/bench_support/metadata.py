"""The metadata-scale artifact: 1,000,000 entries (100 directories of 10,000), never read.

Built through the store API in one transaction rather than by listing a million objects: the
mount only needs the entries. Run as a child process by the benchmark (its memory is not ours):

    python metadata.py STORE_URI ENTRIES   ->   prints the run id
"""

from __future__ import annotations

import hashlib
import sys
import time

DIRECTORIES = 100


def path_of(index: int, per_dir: int) -> str:
    return f"m{index // per_dir:03d}/f{index:07d}.bin"


def build(store_uri: str, count: int) -> str:
    from artifactfs.entries import TYPE_S3, ArtifactFileData
    from artifactfs.naming import ProjectName
    from artifactfs.store import Store
    from artifactfs.tracking import merged_entries

    per_dir = max(1, count // DIRECTORIES)
    entries = {}
    for index in range(count):
        path = path_of(index, per_dir)
        url = f"s3://bench/meta/{path}"
        entries[path] = ArtifactFileData(
            path,
            hashlib.md5(path.encode()).hexdigest(),
            TYPE_S3,
            16384,
            {"file_path": url, "location": url, "last_modified": "2026-01-01 00:00:00"},
        )
    store = Store(store_uri)
    try:
        run = store.create_run(ProjectName("bench", "meta"))
        store.update_field(run, "big", lambda old: merged_entries(old, entries))
    finally:
        store.close()
    return run.run_id


if __name__ == "__main__":
    started = time.monotonic()
    run_id = build(sys.argv[1], int(sys.argv[2]))
    print(f"built in {time.monotonic() - started:.1f}s", file=sys.stderr)
    print(run_id)
