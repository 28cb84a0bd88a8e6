"""Properties, checked with hypothesis: the artifact hash, the reasons path validation gives,
and the mount's core (tree + reader + the FUSE translator, without FUSE) against a dict model.

The artifact hash's fixed vectors are in `test_artifact_hash.py` (its `reference_hash` is the
SPEC's formula written independently); path acceptance properties are in `test_paths.py`; the
tree alone against a model in `test_tree.py`. What is added here: order independence and field
sensitivity of the hash over arbitrary entries, that every refused path names a reason that is
true of it, and a model test that also reads bytes and extended attributes through
`ArtifactOperations`, over local files and remote ones (an in-memory S3 source), chunk by chunk.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import artifactfs
from artifactfs import ArtifactFileData
from artifactfs import sources as sources_module
from artifactfs.cache import ChunkCache, chunk_key
from artifactfs.entries import (
    MAX_PATH_BYTES,
    MAX_SEGMENT_BYTES,
    find_file_dir_conflict,
    path_problem,
)
from artifactfs.fs.fuse_ops import ArtifactOperations
from artifactfs.fs.tree import ROOT_INODE, XATTR_PREFIX, Tree
from artifactfs.naming import ProjectName
from artifactfs.reader import Reader
from artifactfs.sources.base import Source
from artifactfs.store import Store
from tests.unit.test_artifact_hash import reference_hash

# -- the artifact hash ---------------------------------------------------------------------------

TYPES = st.one_of(st.sampled_from(["Local", "S3", "GCS"]), st.text(min_size=1, max_size=6))
SIZES = st.one_of(st.none(), st.integers(0, 2**63 - 1))
HASHES = st.one_of(st.text("0123456789abcdef", min_size=32, max_size=40), st.text(max_size=12))
PATHS = st.text(
    st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20
)  # any text: the hash does not validate paths
METADATA = st.dictionaries(st.text(max_size=5), st.text(max_size=8), max_size=3)


@st.composite
def artifacts(draw: Any, min_size: int = 0) -> list[ArtifactFileData]:
    paths = draw(st.lists(PATHS, min_size=min_size, max_size=8, unique=True))
    return [
        ArtifactFileData(path, draw(HASHES), draw(TYPES), draw(SIZES), draw(METADATA))
        for path in paths
    ]


def as_tuples(entries: list[ArtifactFileData]) -> list[tuple[str, str, str, int | None]]:
    return [(e.file_path, e.file_hash, e.type, e.size) for e in entries]


@settings(max_examples=300, deadline=None)
@given(artifacts(), st.randoms(use_true_random=False))
def test_hash_is_the_reference_formula_in_any_order(
    entries: list[ArtifactFileData], rng: Any
) -> None:
    expected = reference_hash(as_tuples(entries))
    shuffled = list(entries)
    rng.shuffle(shuffled)
    assert artifactfs.artifact_hash(entries) == expected
    assert artifactfs.artifact_hash(shuffled) == expected
    assert artifactfs.artifact_hash(iter(shuffled)) == expected  # any iterable, consumed once


@settings(max_examples=300, deadline=None)
@given(artifacts(min_size=1), st.data())
def test_changing_any_one_field_of_any_entry_changes_the_hash(
    entries: list[ArtifactFileData], data: Any
) -> None:
    before = artifactfs.artifact_hash(entries)
    index = data.draw(st.integers(0, len(entries) - 1), label="entry")
    old = entries[index]
    what = data.draw(st.sampled_from(["file_path", "file_hash", "size", "type"]), label="field")
    if what == "file_path":
        taken = {e.file_path for e in entries}
        new_value: Any = data.draw(PATHS.filter(lambda p: p not in taken), label="new path")
        changed = ArtifactFileData(new_value, old.file_hash, old.type, old.size, old.metadata)
    elif what == "file_hash":
        new_value = data.draw(HASHES.filter(lambda h: h != old.file_hash), label="new hash")
        changed = ArtifactFileData(old.file_path, new_value, old.type, old.size, old.metadata)
    elif what == "size":
        new_value = data.draw(SIZES.filter(lambda s: s != old.size), label="new size")
        changed = ArtifactFileData(old.file_path, old.file_hash, old.type, new_value, old.metadata)
    else:
        new_value = data.draw(TYPES.filter(lambda t: t != old.type), label="new type")
        changed = ArtifactFileData(old.file_path, old.file_hash, new_value, old.size, old.metadata)
    after = [*entries[:index], changed, *entries[index + 1 :]]
    assert artifactfs.artifact_hash(after) != before, (what, new_value)
    assert artifactfs.artifact_hash(after) == reference_hash(as_tuples(after))


@settings(max_examples=200, deadline=None)
@given(artifacts(min_size=1), st.data())
def test_adding_or_removing_an_entry_changes_the_hash(
    entries: list[ArtifactFileData], data: Any
) -> None:
    before = artifactfs.artifact_hash(entries)
    index = data.draw(st.integers(0, len(entries) - 1))
    assert artifactfs.artifact_hash(entries[:index] + entries[index + 1 :]) != before
    taken = {e.file_path for e in entries}
    extra = ArtifactFileData(
        data.draw(PATHS.filter(lambda p: p not in taken)), data.draw(HASHES), "S3", None
    )
    assert artifactfs.artifact_hash([*entries, extra]) != before


@settings(max_examples=200, deadline=None)
@given(artifacts(), st.data())
def test_metadata_never_changes_the_hash(entries: list[ArtifactFileData], data: Any) -> None:
    other = [
        ArtifactFileData(e.file_path, e.file_hash, e.type, e.size, data.draw(METADATA))
        for e in entries
    ]
    assert artifactfs.artifact_hash(other) == artifactfs.artifact_hash(entries)


# -- path validation: every refusal names a reason that is true of the path ----------------------

SEGMENT_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="/")
SEGMENTS = st.one_of(
    st.sampled_from(["", ".", "..", "a", "é", "\x00", "x" * 256, "é" * 128, "日" * 85]),
    st.text(SEGMENT_CHARS, max_size=10),
)
ANY_PATH = st.one_of(
    st.lists(SEGMENTS, min_size=1, max_size=6).map("/".join),
    st.lists(SEGMENTS, min_size=1, max_size=6).map(lambda parts: "/" + "/".join(parts)),
    st.lists(st.just("d" * 255), min_size=15, max_size=18).map("/".join),  # near 4096 bytes
    st.text(max_size=30),  # includes lone surrogates
)


def _utf8_ok(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# reason -> what must be true of a path refused for it
REASON_HOLDS = {
    "empty path": lambda p: p == "",
    "contains a NUL byte": lambda p: "\x00" in p,
    "absolute path": lambda p: p.startswith("/"),
    "not valid UTF-8": lambda p: not _utf8_ok(p),
    f"longer than {MAX_PATH_BYTES} bytes": lambda p: len(p.encode("utf-8")) > MAX_PATH_BYTES,
    "empty path segment": lambda p: "" in p.split("/"),
    "'..' segment": lambda p: ".." in p.split("/"),
    "'.' segment": lambda p: "." in p.split("/"),
    f"a segment is longer than {MAX_SEGMENT_BYTES} bytes": lambda p: any(
        len(s.encode("utf-8")) > MAX_SEGMENT_BYTES for s in p.split("/")
    ),
}


@settings(max_examples=1000, deadline=None)
@given(ANY_PATH)
def test_every_refused_path_names_a_reason_that_is_true_of_it(path: str) -> None:
    problem = path_problem(path)
    if problem is None:
        # Accepted: none of the reasons holds.
        holding = [reason for reason, holds in REASON_HOLDS.items() if holds(path)]
        assert not holding, f"{path!r} accepted although {holding}"
        return
    assert problem in REASON_HOLDS, f"{path!r}: unknown reason {problem!r}"
    assert REASON_HOLDS[problem](path), f"{path!r} refused for {problem!r}, which is not true"


# -- the mount's core against a model -------------------------------------------------------------

CHUNK = 7  # odd and tiny: most reads cross chunk boundaries
NAMES = ["a", "b", "c.txt", "d", "é", "x y"]
FILE_PATHS = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
FILES = st.dictionaries(
    FILE_PATHS,
    st.tuples(st.sampled_from(["Local", "S3"]), st.binary(max_size=40)),
    min_size=1,
    max_size=8,
).filter(lambda files: find_file_dir_conflict(files) is None)
XATTRS = ["file_hash", "type", "size", "source", "cached", "artifact_hash", "nope"]


class MemoryS3(Source):
    """S3 entries served from a dict; counts the ranged reads it answers."""

    type_name = "S3"

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.reads: list[tuple[str, int, int | None]] = []

    def list_location(self, location: str, on_progress: Any = None) -> Iterator[ArtifactFileData]:
        raise NotImplementedError

    def open_stream(
        self, entry: ArtifactFileData, offset: int = 0, length: int | None = None
    ) -> Iterator[bytes]:
        self.reads.append((entry.source_url, offset, length))
        data = self.objects[entry.source_url]
        end = len(data) if length is None else offset + length
        return iter([data[offset:end]])

    def check(self, entry: ArtifactFileData) -> None:
        pass


@dataclass
class Model:
    files: dict[str, tuple[str, bytes]]
    dirs: dict[str, set[str]] = field(default_factory=dict)
    touched: set[tuple[str, int]] = field(default_factory=set)  # (content md5, chunk index)

    def __post_init__(self) -> None:
        self.dirs[""] = set()
        for path in self.files:
            parts = path.split("/")
            for depth in range(len(parts)):
                self.dirs.setdefault("/".join(parts[:depth]), set()).add(parts[depth])

    def read(self, path: str, offset: int, length: int) -> bytes:
        kind, body = self.files[path]
        data = body[offset : offset + length] if length > 0 else b""
        if kind == "S3" and data:
            digest = hashlib.md5(body).hexdigest()
            for index in range(offset // CHUNK, (offset + len(data) - 1) // CHUNK + 1):
                self.touched.add((digest, index))
        return data

    def cached(self, path: str) -> int:
        kind, body = self.files[path]
        if kind == "Local":
            return len(body)
        digest = hashlib.md5(body).hexdigest()
        return sum(
            len(body[i * CHUNK : (i + 1) * CHUNK])
            for i in range(max(1, -(-len(body) // CHUNK)))
            if (digest, i) in self.touched
        )

    def _chunk_sizes(self) -> dict[tuple[str, int], int]:
        sizes = {}
        for kind, body in self.files.values():
            if kind != "S3":
                continue
            digest = hashlib.md5(body).hexdigest()
            for i in range(max(1, -(-len(body) // CHUNK))):
                sizes[(digest, i)] = len(body[i * CHUNK : (i + 1) * CHUNK])
        return sizes

    def fetched(self) -> int:
        """Bytes of the distinct remote chunks read so far."""
        sizes = self._chunk_sizes()
        return sum(sizes[key] for key in self.touched)

    def remote_bytes(self) -> int:
        """Bytes of all distinct remote chunks: the most a reader may ever fetch here."""
        return sum(self._chunk_sizes().values())


@pytest.fixture
def memory_s3() -> Iterator[MemoryS3]:
    """The process's S3 source, for the whole test (all its examples): background fetches
    (read-ahead, neighbour prefetch) that outlive an example still find their objects."""
    source = MemoryS3({})
    saved = sources_module._sources.get("S3")
    sources_module._sources["S3"] = source
    try:
        yield source
    finally:
        if saved is None:
            sources_module._sources.pop("S3", None)
        else:
            sources_module._sources["S3"] = saved


def make_entries(
    root: Path, files: dict[str, tuple[str, bytes]], bucket: str
) -> list[ArtifactFileData]:
    entries = []
    for index, (path, (kind, body)) in enumerate(sorted(files.items())):
        metadata = {"last_modified": "2024-05-06 07:08:09"}
        if kind == "Local":
            local = root / f"f{index}"
            local.write_bytes(body)
            metadata["file_path"] = f"file://{local}"
            file_hash = hashlib.sha1(body).hexdigest()
        else:
            metadata["file_path"] = metadata["location"] = f"s3://{bucket}/obj{index}"
            file_hash = hashlib.md5(body).hexdigest()
        entries.append(ArtifactFileData(path, file_hash, kind, len(body), metadata))
    return entries


@st.composite
def operations(draw: Any, model: Model) -> list[tuple[str, list[str], int, int, str]]:
    """Mostly on paths that exist (every file and directory), sometimes on ones that do not."""
    known = sorted(set(model.files) | set(model.dirs))
    existing = st.sampled_from(known).map(lambda p: p.split("/") if p else [])
    missing = st.lists(st.sampled_from([*NAMES, "..", ".", "zz", "a/b", ""]), max_size=4)
    found = []
    for _ in range(draw(st.integers(5, 40))):
        segments = draw(st.one_of(existing, existing, existing, missing))
        path = "/".join(segments)
        size = len(model.files[path][1]) if path in model.files else 0
        found.append(
            (
                draw(st.sampled_from(["lookup", "list", "getattr", "read", "read", "xattr"])),
                segments,
                draw(st.one_of(st.integers(0, max(size, 1)), st.integers(0, 60))),
                draw(st.one_of(st.integers(1, CHUNK * 3), st.integers(0, 60))),
                draw(st.sampled_from(XATTRS)),
            )
        )
    return found


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(files=FILES, whole_store=st.booleans(), data=st.data())
def test_operations_match_a_dict_model(
    memory_s3: MemoryS3, files: dict[str, tuple[str, bytes]], whole_store: bool, data: Any
) -> None:
    model = Model(files)
    steps = data.draw(operations(model), label="operations")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        entries = make_entries(root, files, bucket=f"b{uuid.uuid4().hex}")
        for entry in entries:
            if entry.type == "S3":
                memory_s3.objects[entry.source_url] = files[entry.file_path][1]
        store = Store(str(root / "store.db"))
        cache = ChunkCache(root / "cache", 1 << 30, free_floor_bytes=0)
        reader = Reader(cache, chunk_size=CHUNK, readahead_chunks=0, deadline=5.0)
        try:
            run = store.create_run(ProjectName("ws", "proj"))
            store.update_field(run, "ns/data", lambda _old: entries)
            artifact_hash = artifactfs.artifact_hash(entries)
            if whole_store:
                tree = Tree(store)
                prefix = ["ws", "proj", run.run_id, "ns", "data"]
            else:
                tree = Tree(store, run.run_id, "ns/data")
                prefix = []
            trio.run(_drive, tree, reader, model, prefix, steps, artifact_hash)
        finally:
            reader.close()
            store.close()


async def _drive(
    tree: Tree,
    reader: Reader,
    model: Model,
    prefix: list[str],
    operations: list[Any],
    artifact_hash: str,
) -> None:
    ops = ArtifactOperations(tree, reader)
    base = ROOT_INODE
    for name in prefix:
        base = (await ops.lookup(base, name.encode(), None)).st_ino
    for what, segments, offset, length, xattr in operations:
        inode, path = base, ""
        for segment in segments:
            if segment == ".":  # the kernel never asks; the translator answers with the parent
                assert (await ops.lookup(inode, b".", None)).st_ino == inode
                continue
            exists = (
                path in model.dirs
                and segment in model.dirs[path]
                and "/" not in segment
                and segment not in ("", ".", "..")
            )
            try:
                inode = (await ops.lookup(inode, os.fsencode(segment), None)).st_ino
            except pyfuse3.FUSEError as exc:
                assert not exists, (path, segment, exc.errno)
                assert exc.errno == errno.ENOENT
                break
            assert exists, (path, segment)
            path = f"{path}/{segment}" if path else segment
        else:
            await _check(ops, model, inode, path, what, offset, length, xattr, artifact_hash)
    # The root's figures follow from the reads made: every chunk read was fetched, none twice
    # (background prefetches of neighbours may have fetched more, never the same chunk again).
    fetched = int(await ops.getxattr(ROOT_INODE, b"user.artifactfs.fetched_bytes", None))
    assert model.fetched() <= fetched <= model.remote_bytes()
    assert int(await ops.getxattr(ROOT_INODE, b"user.artifactfs.errors", None)) == 0
    prefetcher = getattr(ops, "prefetcher", None)
    if prefetcher is not None:
        prefetcher.close()


async def _check(
    ops: ArtifactOperations,
    model: Model,
    inode: int,
    path: str,
    what: str,
    offset: int,
    length: int,
    xattr: str,
    artifact_hash: str,
) -> None:
    is_file = path in model.files
    attributes = await ops.getattr(inode, None)
    assert stat.S_ISREG(attributes.st_mode) == is_file, path
    if what == "getattr":
        if is_file:
            assert attributes.st_size == len(model.files[path][1])
            assert stat.S_IMODE(attributes.st_mode) == 0o444
        else:
            assert stat.S_IMODE(attributes.st_mode) == 0o555
    elif what == "list":
        if is_file:
            with pytest.raises(pyfuse3.FUSEError) as raised:
                await ops.opendir(inode, None)
            assert raised.value.errno == errno.ENOTDIR
            return
        handle = await ops.opendir(inode, None)
        try:
            listed = [os.fsdecode(name) for name, _, _ in ops._listings[handle]]  # readdir's
        finally:
            await ops.releasedir(handle)
        assert listed == sorted(model.dirs[path])
    elif what == "read":
        if not is_file:
            with pytest.raises(pyfuse3.FUSEError) as raised:
                await ops.open(inode, os.O_RDONLY, None)
            assert raised.value.errno == errno.EISDIR
            return
        info = await ops.open(inode, os.O_RDONLY, None)
        try:
            data = await ops.read(info.fh, offset, length)
        finally:
            await ops.release(info.fh)
        assert bytes(data) == model.read(path, offset, length), (path, offset, length)
    elif what in ("xattr", "listxattr"):
        names = {n.decode() for n in await ops.listxattr(inode, None)}
        if not is_file:
            assert "user.artifactfs.file_hash" not in names
            return
        kind, body = model.files[path]
        expected = {
            "file_hash": (hashlib.sha1 if kind == "Local" else hashlib.md5)(body).hexdigest(),
            "type": kind,
            "size": str(len(body)),
            "cached": "",  # checked below against the model, as a range
            "artifact_hash": artifact_hash,
        }
        assert {XATTR_PREFIX + key for key in expected} <= names
        if what == "listxattr":
            return
        try:
            value: str | None = (
                await ops.getxattr(inode, (XATTR_PREFIX + xattr).encode(), None)
            ).decode()
        except pyfuse3.FUSEError as exc:
            assert exc.errno == pyfuse3.ENOATTR
            value = None
        if xattr == "source":
            assert value is not None and value.startswith("file://" if kind == "Local" else "s3://")
        elif xattr == "cached":  # at least what was read; prefetches may have added more
            assert value is not None
            assert model.cached(path) <= int(value) <= len(body), (path, value)
        else:
            assert value == expected.get(xattr), (path, xattr)


def test_model_counts_chunks_like_the_cache_keys() -> None:
    """The model's notion of a chunk is the cache's: one key per (hash, size, index)."""
    body = bytes(range(20))
    digest = hashlib.md5(body).hexdigest()
    keys = {chunk_key("S3", digest, len(body), CHUNK, i) for i in range(3)}
    assert len(keys) == 3
    model = Model({"a": ("S3", body)})
    assert model.read("a", 5, 4) == body[5:9]  # chunks 0 and 1
    assert model.cached("a") == 2 * CHUNK
    assert model.fetched() == 2 * CHUNK
