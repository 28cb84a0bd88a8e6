"""The artifact hash against an independent implementation of SPEC's formula ("Hashes").

Nothing here calls artifactfs to compute the expected value: `reference_hash` below is written
from the SPEC text alone, and file hashes come from `hashlib.sha1` over the bytes the test wrote.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

import artifactfs
from artifactfs import ArtifactFileData
from tests.conftest import make_tree


def reference_hash(entries: list[tuple[str, str, str, int | None]]) -> str:
    """SHA-256 over (file_path, file_hash, type, size) sorted by file_path, per SPEC."""
    digest = hashlib.sha256()
    for file_path, file_hash, type_name, size in sorted(entries, key=lambda e: e[0]):
        digest.update(b"#")
        digest.update(len(file_path).to_bytes(4, "big"))  # characters, not UTF-8 bytes
        digest.update(file_path.encode("utf-8"))
        digest.update(b"#")
        digest.update(file_hash.encode("utf-8"))
        digest.update(b"#")
        if size is not None:
            digest.update(size.to_bytes(8, "big"))
        digest.update(b"#")
        digest.update(len(type_name).to_bytes(4, "big"))
        digest.update(type_name.encode("utf-8"))
    return digest.hexdigest()


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


# -- fixed vectors ----------------------------------------------------------------------------

# Neptune client's own unit test vector (test_file_hasher.py, get_artifact_hash_without_metadata):
# metadata is excluded, the second entry has no size.
NEPTUNE_ENTRIES = [
    ArtifactFileData(
        "to/file1",
        "c38444d2ccff1a7aab3d323fb6234e1b4f0a81ac",
        "S3",
        5234,
        {"location": "s3://bucket/path/to/file1", "last_modification": "2021-08-09 10:22:53"},
    ),
    ArtifactFileData(
        "from/file2",
        "4347d0f8ba661234a8eadc005e2e1d1b646c9682",
        "S3",
        None,
        {"location": "s3://bucket/path/to/file2", "last_modification": "2021-08-09 10:32:12"},
    ),
]
NEPTUNE_HASH = "e6d96bccc12db43acc6e24e2e79052ecaee52307470e44f93d74ecfebc119128"

# Computed once with `reference_hash` and pinned: non-ASCII paths (characters != bytes),
# an empty file (size 0, which is 8 zero bytes, not "nothing").
KNOWN_ENTRIES = [
    ArtifactFileData("日本.txt", sha1(b"hello world"), "Local", 11, {"file_path": "file:///x"}),
    ArtifactFileData("données/é.csv", sha1(b""), "Local", 0),
]
KNOWN_HASH = "6d7d8e5b5a57aacb78de99e0055cbd8e3b27211816228ef0fe85105dd4ac173c"


def as_tuples(entries: list[ArtifactFileData]) -> list[tuple[str, str, str, int | None]]:
    return [(e.file_path, e.file_hash, e.type, e.size) for e in entries]


def test_neptune_vector() -> None:
    assert reference_hash(as_tuples(NEPTUNE_ENTRIES)) == NEPTUNE_HASH
    assert artifactfs.artifact_hash(NEPTUNE_ENTRIES) == NEPTUNE_HASH
    assert artifactfs.artifact_hash(list(reversed(NEPTUNE_ENTRIES))) == NEPTUNE_HASH


def test_known_vector() -> None:
    assert KNOWN_ENTRIES[0].file_hash == "2aae6c35c94fcfb415dbe95f408b9ce91ee846ed"
    assert KNOWN_ENTRIES[1].file_hash == "da39a3ee5e6b4b0d3255bfef95601890afd80709"
    assert reference_hash(as_tuples(KNOWN_ENTRIES)) == KNOWN_HASH
    assert artifactfs.artifact_hash(KNOWN_ENTRIES) == KNOWN_HASH
    assert artifactfs.artifact_hash(reversed(KNOWN_ENTRIES)) == KNOWN_HASH


def test_metadata_is_excluded() -> None:
    with_other_metadata = [
        ArtifactFileData(e.file_path, e.file_hash, e.type, e.size, {"file_path": "file:///y"})
        for e in KNOWN_ENTRIES
    ]
    assert artifactfs.artifact_hash(with_other_metadata) == KNOWN_HASH


def test_unknown_size_contributes_nothing() -> None:
    unknown = [ArtifactFileData("a/b", "0123abcd", "S3", None)]
    expected = hashlib.sha256(
        b"#"
        + (3).to_bytes(4, "big")
        + b"a/b"
        + b"#0123abcd#"
        + b"#"
        + (2).to_bytes(4, "big")
        + b"S3"
    ).hexdigest()
    assert artifactfs.artifact_hash(unknown) == expected
    assert reference_hash(as_tuples(unknown)) == expected
    # ... which is not the same as a size of zero (eight zero bytes).
    zero = [ArtifactFileData("a/b", "0123abcd", "S3", 0)]
    assert artifactfs.artifact_hash(zero) != expected
    assert artifactfs.artifact_hash(zero) == reference_hash(as_tuples(zero))


def test_length_is_counted_in_characters() -> None:
    entry = ArtifactFileData("é", "h", "Local", 1)
    by_chars = hashlib.sha256(
        b"#"
        + (1).to_bytes(4, "big")  # one character, two UTF-8 bytes
        + "é".encode()
        + b"#h#"
        + (1).to_bytes(8, "big")
        + b"#"
        + (5).to_bytes(4, "big")
        + b"Local"
    ).hexdigest()
    assert artifactfs.artifact_hash([entry]) == by_chars


def test_sorted_in_python_string_order() -> None:
    # "Z" < "a" < "é" < "日" in code-point order; upper case first, unlike a locale collation.
    entries = [
        ArtifactFileData(path, sha1(path.encode()), "Local", len(path))
        for path in ["日", "a", "é", "Z", "a/b", "a b", "a.b"]
    ]
    assert artifactfs.artifact_hash(entries) == reference_hash(as_tuples(entries))
    assert artifactfs.artifact_hash(entries[::-1]) == reference_hash(as_tuples(entries))


def test_empty_artifact() -> None:
    assert artifactfs.artifact_hash([]) == hashlib.sha256(b"").hexdigest()


# -- a tracked local tree ---------------------------------------------------------------------

TREE = {
    "données/é.csv": "a;b\n1;é\n".encode(),
    "日本.txt": "こんにちは\n".encode(),
    "with space/file name.txt": b"spaces\n",
    "empty.bin": b"",
    "deep/er/still/deeper/leaf.dat": bytes(range(256)) * 9,
    "top.txt": b"top\n",
}
OUTSIDE_BODY = b"outside the tree, reached through a symlink\n"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = make_tree(tmp_path / "tree", TREE)
    outside = make_tree(tmp_path / "outside", {"target.txt": OUTSIDE_BODY, "sub/x.txt": b"x"})
    os.symlink(outside / "target.txt", root / "linked.txt")  # a symlinked file: followed
    os.symlink(outside / "sub", root / "linked_dir")  # a symlinked directory: skipped
    return root


def expected_tree_entries() -> list[tuple[str, str, str, int | None]]:
    files = dict(TREE)
    files["linked.txt"] = OUTSIDE_BODY
    return [(path, sha1(body), "Local", len(body)) for path, body in files.items()]


def test_tracked_tree_hash_matches_reference(tree: Path) -> None:
    run = artifactfs.init_run(project="ml-team/classification")
    run["data"].track_files(str(tree))
    files = run["data"].fetch_files_list()
    got = sorted((f.file_path, f.file_hash, f.type, f.size) for f in files)
    assert got == sorted(expected_tree_entries())
    assert not any(f.file_path.startswith("linked_dir") for f in files)
    assert run["data"].fetch_hash() == reference_hash(expected_tree_entries())


def test_symlinked_directory_is_skipped(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root", {"real/a.txt": b"a"})
    elsewhere = make_tree(tmp_path / "elsewhere", {"b.txt": b"b", "c/d.txt": b"d"})
    os.symlink(elsewhere, root / "link")
    os.symlink(root / "real", root / "loop")  # a link back into the tree: skipped too
    run = artifactfs.init_run(project="p")
    run["f"].track_files(str(root))
    assert [f.file_path for f in run["f"].fetch_files_list()] == ["real/a.txt"]
    assert run["f"].fetch_hash() == reference_hash([("real/a.txt", sha1(b"a"), "Local", 1)])


def test_order_of_track_files_calls_does_not_matter(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path / "root",
        {"A/one.csv": b"1\n", "A/sub/two.csv": b"22\n", "B/three.csv": b"333\n", "B/é.txt": b""},
    )
    run_ab = artifactfs.init_run(project="p")
    run_ab["f"].track_files(str(root / "A"), destination="A")
    run_ab["f"].track_files(str(root / "B"), destination="B")
    run_ba = artifactfs.init_run(project="p")
    run_ba["f"].track_files(str(root / "B"), destination="B")
    run_ba["f"].track_files(str(root / "A"), destination="A")
    run_all = artifactfs.init_run(project="p")
    run_all["f"].track_files(str(root))
    hashes = {run["f"].fetch_hash() for run in (run_ab, run_ba, run_all)}
    assert len(hashes) == 1
    expected = reference_hash(
        [
            ("A/one.csv", sha1(b"1\n"), "Local", 2),
            ("A/sub/two.csv", sha1(b"22\n"), "Local", 3),
            ("B/three.csv", sha1(b"333\n"), "Local", 4),
            ("B/é.txt", sha1(b""), "Local", 0),
        ]
    )
    assert hashes == {expected}


def test_retracking_replaces_entries_with_the_same_path(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root", {"a.txt": b"first", "b/c.txt": b"c"})
    run = artifactfs.init_run(project="p")
    run["f"].track_files(str(root))
    before = run["f"].fetch_hash()
    (root / "a.txt").write_bytes(b"second version, longer")
    run["f"].track_files(str(root))
    after = run["f"].fetch_hash()
    files = run["f"].fetch_files_list()
    assert after != before
    assert len(files) == 2
    assert after == reference_hash(
        [
            ("a.txt", sha1(b"second version, longer"), "Local", 22),
            ("b/c.txt", sha1(b"c"), "Local", 1),
        ]
    )
    # Tracking a single file again replaces just that entry too.
    (root / "b" / "c.txt").write_bytes(b"cc")
    run["f"].track_files(str(root / "b" / "c.txt"), destination="b")
    assert len(run["f"].fetch_files_list()) == 2
    assert run["f"].fetch_hash() == reference_hash(
        [
            ("a.txt", sha1(b"second version, longer"), "Local", 22),
            ("b/c.txt", sha1(b"cc"), "Local", 2),
        ]
    )


def test_tracking_adds_to_existing_entries(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root", {"x.txt": b"x", "y.txt": b"yy"})
    run = artifactfs.init_run(project="p")
    run["f"].track_files(str(root / "x.txt"))
    run["f"].track_files(str(root / "y.txt"))
    assert run["f"].fetch_hash() == reference_hash(
        [("x.txt", sha1(b"x"), "Local", 1), ("y.txt", sha1(b"yy"), "Local", 2)]
    )
