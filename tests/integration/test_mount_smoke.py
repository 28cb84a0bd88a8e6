"""The mount's basic promise, end to end: files at their paths, bytes and hashes as tracked."""

import hashlib
import os
from pathlib import Path

from tests.conftest import make_tree
from tests.support.mounts import mounted


def test_local_artifact_reads_back_through_the_mount(cli, tmp_path: Path) -> None:
    files = {"train/a.csv": b"a,b\n1,2\n", "b.txt": os.urandom(300_000)}
    data = make_tree(tmp_path / "datasets", files)
    run_id = cli("--project", "ml/cls", "track", "data_versions", str(data), check=True).last_line
    with mounted(tmp_path / "mnt") as mount:
        base = mount.path / "ml" / "cls" / run_id / "data_versions"
        for rel, body in files.items():
            assert (base / rel).read_bytes() == body
            assert mount.xattr(f"ml/cls/{run_id}/data_versions/{rel}", "file_hash") == (
                hashlib.sha1(body).hexdigest()
            )
