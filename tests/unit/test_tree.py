"""The mount's tree without FUSE: layouts, attributes, xattrs, inode numbers, hostile rows.

Every test tracks real local files into a real SQLite store and drives `Tree` directly, the way
`fuse_ops` does. Hostile rows are planted with sqlite3, bypassing every check tracking makes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import artifactfs
from artifactfs.entries import find_file_dir_conflict, parse_time
from artifactfs.errors import ArtifactfsError, NotFoundError
from artifactfs.fs.tree import ROOT_INODE, Kind, Node, Tree, inode_for
from artifactfs.store import ArtifactRecord, Store
from tests.conftest import make_tree

STAMP = 1_700_000_000  # 2023-11-14 22:13:20 UTC


def set_mtimes(root: Path, stamp: int = STAMP) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (stamp, stamp))


def artifact_of(store_path: str, run_id: str, field: str) -> ArtifactRecord:
    store = Store(store_path)
    try:
        return store.field_artifact(store.get_run(run_id), field)
    finally:
        store.close()


def names(nodes: list[Node]) -> list[str]:
    return [node.name for node in nodes]


def resolve(tree: Tree, path: str, start: Node | None = None) -> Node | None:
    node = start or tree.root()
    for segment in path.split("/") if path else []:
        found = tree.lookup(node, segment)
        if found is None:
            return None
        node = found
    return node


def walk(tree: Tree, node: Node | None = None) -> list[Node]:
    node = node or tree.root()
    found = [node]
    for child in tree.children(node):
        found.extend(walk(tree, child))
    return found


@pytest.fixture
def store_path(tmp_path: Path) -> str:
    return str(tmp_path / "store.db")


@pytest.fixture
def store(store_path: str) -> Store:
    the_store = Store(store_path)
    yield the_store
    the_store.close()


TRAIN = {"a.csv": b"a,b\n1,2\n", "sub/b.csv": b"bbbb", "sub/deeper/c.bin": b"\x00" * 300}
VAL = {"v.csv": b"val\n"}


@pytest.fixture
def populated(tmp_path: Path, store_path: str) -> dict[str, str]:
    """ml-team/classification CLS-1 (datasets/train, datasets/val, model), CLS-2 (model);
    default/other OTH-1 (data)."""
    train = make_tree(tmp_path / "train", TRAIN)
    val = make_tree(tmp_path / "val", VAL)
    model = make_tree(tmp_path / "model", {"weights.pt": b"w" * 1234})
    for root in (train, val, model):
        set_mtimes(root)
    run1 = artifactfs.init_run(project="ml-team/classification", store=store_path)
    run1["datasets/train"].track_files(str(train))
    run1["datasets/val"].track_files(str(val))
    run1["model"].track_files(str(model / "weights.pt"))
    run2 = artifactfs.init_run(project="ml-team/classification", store=store_path)
    run2["model"].track_files(str(model))
    other = artifactfs.init_run(project="other", store=store_path, project_key="OTH")
    other["data"].track_files(str(val))
    assert (run1.id, run2.id, other.id) == ("CLS-1", "CLS-2", "OTH-1")
    return {
        "train_hash": run1["datasets/train"].fetch_hash(),
        "train_id": artifact_of(store_path, "CLS-1", "datasets/train").id,
        "val_hash": run1["datasets/val"].fetch_hash(),
        "train_dir": str(train),
    }


# -- layouts -----------------------------------------------------------------------------------


def test_whole_store_layout(store: Store, populated: dict[str, str]) -> None:
    tree = Tree(store)
    root = tree.root()
    assert root.kind is Kind.ROOT
    assert root.inode == ROOT_INODE
    assert names(tree.children(root)) == ["default", "ml-team"]

    workspace = tree.lookup(root, "ml-team")
    assert workspace is not None and workspace.kind is Kind.WORKSPACE
    assert names(tree.children(workspace)) == ["classification"]
    project = tree.lookup(workspace, "classification")
    assert project is not None and project.kind is Kind.PROJECT
    assert names(tree.children(project)) == ["CLS-1", "CLS-2"]
    run = tree.lookup(project, "CLS-1")
    assert run is not None and run.kind is Kind.RUN and run.run_id == "CLS-1"
    assert names(tree.children(run)) == ["datasets", "model"]

    namespace = tree.lookup(run, "datasets")
    assert namespace is not None and namespace.kind is Kind.NAMESPACE
    assert names(tree.children(namespace)) == ["train", "val"]
    train = tree.lookup(namespace, "train")
    assert train is not None and train.kind is Kind.ARTIFACT_DIR
    assert train.path == "ml-team/classification/CLS-1/datasets/train"
    assert train.field_path == "datasets/train"
    assert train.dir_path == ""
    assert train.artifact_id == populated["train_id"]
    assert names(tree.children(train)) == ["a.csv", "sub"]

    sub = tree.lookup(train, "sub")
    assert sub is not None and sub.kind is Kind.ARTIFACT_DIR and sub.dir_path == "sub"
    assert names(tree.children(sub)) == ["b.csv", "deeper"]
    c = resolve(tree, "deeper/c.bin", sub)
    assert c is not None and c.kind is Kind.FILE
    assert c.path == "ml-team/classification/CLS-1/datasets/train/sub/deeper/c.bin"
    assert c.entry is not None and c.entry.file_path == "sub/deeper/c.bin"
    assert tree.children(c) == []
    assert tree.lookup(c, "anything") is None

    model = resolve(tree, "ml-team/classification/CLS-1/model")
    assert model is not None and model.kind is Kind.ARTIFACT_DIR
    assert names(tree.children(model)) == ["weights.pt"]
    assert names(tree.children(resolve(tree, "default/other/OTH-1/data"))) == ["v.csv"]

    # Every child listed is what lookup of its name returns.
    for node in walk(tree):
        for child in tree.children(node):
            assert tree.lookup(node, child.name) == child


def test_missing_names_are_none(store: Store, populated: dict[str, str]) -> None:
    tree = Tree(store)
    for path in (
        "nobody",
        "ml-team/nothing",
        "ml-team/classification/CLS-3",
        "ml-team/classification/CLS-1/nofield",
        "ml-team/classification/CLS-1/datasets/test",
        "ml-team/classification/CLS-1/datasets/train/missing.csv",
        "ml-team/classification/CLS-1/datasets/train/sub/deeper/c.bin/x",
        "ml-team/classification/CLS-1/datasets/train/a.csv/x",
    ):
        assert resolve(tree, path) is None, path


def test_a_run_answers_to_its_exact_name_only(store: Store, populated: dict[str, str]) -> None:
    tree = Tree(store)
    project = resolve(tree, "ml-team/classification")
    assert project is not None
    assert names(tree.children(project)) == ["CLS-1", "CLS-2"]
    run = tree.lookup(project, "CLS-1")
    assert run is not None and run.name == "CLS-1"
    # The store forgives whitespace around an id; the mount must not (an unlisted alias).
    for alias in ("CLS-1 ", " CLS-1", "\tCLS-1", "CLS-1\n", "CLS-1\r", " CLS-1 "):
        assert tree.lookup(project, alias) is None, repr(alias)


def test_only_names_inside_an_artifact_are_final(store: Store, populated: dict[str, str]) -> None:
    tree = Tree(store)
    # A field tracked again keeps its name and gets a new artifact: its root's name is not.
    for path in ("ml-team", "ml-team/classification/CLS-1", "ml-team/classification/CLS-1/model"):
        node = resolve(tree, path)
        assert node is not None and not node.name_is_final, path
    for path in ("ml-team/classification/CLS-1/model/weights.pt", "default/other/OTH-1/data/v.csv"):
        node = resolve(tree, path)
        assert node is not None and node.name_is_final, path
    sub = resolve(tree, "ml-team/classification/CLS-1/datasets/train/sub")
    assert sub is not None and sub.name_is_final
    assert Tree(store, run_id="CLS-1", field_path="model").root().name_is_final


def test_new_runs_appear_without_a_new_tree(
    tmp_path: Path, store: Store, store_path: str, populated: dict[str, str]
) -> None:
    tree = Tree(store)
    project = resolve(tree, "ml-team/classification")
    assert project is not None
    assert names(tree.children(project)) == ["CLS-1", "CLS-2"]
    run = artifactfs.init_run(project="ml-team/classification", store=store_path)
    run["late"].track_files(str(make_tree(tmp_path / "late", {"x": b"x"})))
    assert names(tree.children(project)) == ["CLS-1", "CLS-2", "CLS-3"]
    assert resolve(tree, "ml-team/classification/CLS-3/late/x") is not None
    artifactfs.init_run(project="brand/new", store=store_path)
    assert names(tree.children(tree.root())) == ["brand", "default", "ml-team"]


def test_run_root(store: Store, populated: dict[str, str]) -> None:
    tree = Tree(store, run_id="CLS-1")
    root = tree.root()
    assert root.kind is Kind.RUN
    assert root.inode == ROOT_INODE
    assert root.run_id == "CLS-1"
    assert names(tree.children(root)) == ["datasets", "model"]
    train = resolve(tree, "datasets/train")
    assert train is not None and train.kind is Kind.ARTIFACT_DIR
    assert train.path == "datasets/train"
    assert train.artifact_id == populated["train_id"]
    c = resolve(tree, "datasets/train/sub/deeper/c.bin")
    assert c is not None and c.kind is Kind.FILE and c.path == "datasets/train/sub/deeper/c.bin"
    assert tree.xattrs(c)["run"] == "CLS-1"
    assert tree.xattrs(c)["field"] == "datasets/train"
    assert tree.xattrs(root) == {"version": artifactfs.__version__}


def test_run_field_root(store: Store, populated: dict[str, str]) -> None:
    tree = Tree(store, run_id="CLS-1", field_path="datasets/train")
    root = tree.root()
    assert root.kind is Kind.ARTIFACT_DIR
    assert root.inode == ROOT_INODE
    assert root.artifact_id == populated["train_id"]
    assert names(tree.children(root)) == ["a.csv", "sub"]
    c = resolve(tree, "sub/deeper/c.bin")
    assert c is not None and c.path == "sub/deeper/c.bin" and c.kind is Kind.FILE
    assert tree.attributes(c).size == 300
    xattrs = tree.xattrs(root)
    assert xattrs["artifact_hash"] == populated["train_hash"]
    assert xattrs["file_count"] == "3"
    assert xattrs["size"] == str(sum(len(body) for body in TRAIN.values()))


@pytest.mark.parametrize(
    ("run_id", "field", "file_path"),
    [
        (None, None, "ml-team/classification/CLS-1/datasets/train/sub/b.csv"),
        ("CLS-1", None, "datasets/train/sub/b.csv"),
        ("CLS-1", "datasets/train", "sub/b.csv"),
        ("CLS-1", "datasets/train", "a.csv"),
    ],
)
def test_siblings_are_remembered_for_the_next_lookups(
    store: Store,
    populated: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    run_id: str | None,
    field: str | None,
    file_path: str,
) -> None:
    """A program opening files one by one: once one is open, its directory is listed once and
    the lookups of its neighbours need no store query, and give the same nodes as a listing."""
    tree = Tree(store, run_id=run_id, field_path=field)
    node = resolve(tree, file_path)
    assert node is not None and node.kind is Kind.FILE
    listing = tree.siblings(node)
    parent = resolve(tree, file_path.rpartition("/")[0])
    assert parent is not None
    assert listing.nodes == tree.children(parent)
    assert listing.names == sorted(listing.names) and node.name in listing.names

    def no_query(*args: object) -> None:
        raise AssertionError("a remembered directory was queried again")

    monkeypatch.setattr(store, "artifact_lookup", no_query)
    monkeypatch.setattr(store, "artifact_children", no_query)
    for name in listing.names:
        assert tree.lookup(parent, name) == listing.by_name[name]
    assert tree.lookup(parent, "missing.csv") is None


def test_next_directory_is_the_following_one_in_name_order(
    tmp_path: Path, store_path: str, store: Store
) -> None:
    """Where a program walking an artifact in order goes after a directory: the next
    directory of the same parent (files between are skipped), none after the last one, and
    none for a file at the artifact's root."""
    files = {
        "top.bin": b"t",
        "d/a/1.bin": b"1",
        "d/a/2.bin": b"2",
        "d/between.bin": b"x",
        "d/b/3.bin": b"3",
        "d/b/sub/4.bin": b"4",
        "d/c/5.bin": b"5",
    }
    run = artifactfs.init_run(project="walk", store=store_path)
    run["data"].track_files(str(make_tree(tmp_path / "walk", files)))
    tree = Tree(store, run_id=run.id, field_path="data")

    def following(path: str) -> list[str] | None:
        node = resolve(tree, path)
        assert node is not None
        listing = tree.next_directory(node)
        return None if listing is None else listing.names

    assert following("d/a/1.bin") == ["3.bin", "sub"]
    assert following("d/b/3.bin") == ["5.bin"]
    assert following("d/b/sub/4.bin") is None  # the last directory of d/b
    assert following("d/c/5.bin") is None
    assert following("d/between.bin") is None  # d is the last directory at the root
    assert following("top.bin") is None
    # The listing is remembered: the program's lookups there need no query.
    node = resolve(tree, "d/a/1.bin")
    assert node is not None
    listing = tree.next_directory(node)
    assert listing is not None
    assert tree.remembered_siblings(listing.nodes[0]) is listing


def test_bad_roots_are_refused(store: Store, populated: dict[str, str]) -> None:
    with pytest.raises(ArtifactfsError):
        Tree(store, field_path="datasets/train")
    with pytest.raises(NotFoundError):
        Tree(store, run_id="CLS-9")
    with pytest.raises(NotFoundError):
        Tree(store, run_id="CLS-1", field_path="nofield")
    with pytest.raises(NotFoundError):
        Tree(store, run_id="CLS-1", field_path="datasets")  # a namespace, not a field
    with pytest.raises(ArtifactfsError):
        Tree(store, run_id="CLS-1", field_path="../datasets/train")
    with pytest.raises(ArtifactfsError):
        Tree(store, run_id="not a run id")


# -- attributes and xattrs ---------------------------------------------------------------------


def test_attributes(store: Store, populated: dict[str, str]) -> None:
    tree = Tree(store)
    for node in walk(tree):
        attributes = tree.attributes(node)
        if node.kind is Kind.FILE:
            assert node.entry is not None
            assert attributes.mode == stat.S_IFREG | 0o444
            assert attributes.size == node.entry.size
            assert attributes.mtime_ns == STAMP * 1_000_000_000
            assert attributes.nlink == 1
        else:
            assert attributes.mode == stat.S_IFDIR | 0o555
            assert attributes.nlink >= 2
    a = resolve(tree, "ml-team/classification/CLS-1/datasets/train/a.csv")
    assert a is not None
    assert tree.attributes(a).size == len(TRAIN["a.csv"])
    weights = resolve(tree, "ml-team/classification/CLS-2/model/weights.pt")
    assert weights is not None
    assert tree.attributes(weights).size == 1234


def test_file_xattrs(store: Store, populated: dict[str, str]) -> None:
    tree = Tree(store)
    node = resolve(tree, "ml-team/classification/CLS-1/datasets/train/sub/b.csv")
    assert node is not None
    source = Path(populated["train_dir"]) / "sub" / "b.csv"
    assert tree.xattrs(node) == {
        "file_hash": hashlib.sha1(TRAIN["sub/b.csv"]).hexdigest(),
        "type": "Local",
        "source": f"file://{source}",
        "last_modified": "2023-11-14 22:13:20",
        "size": str(len(TRAIN["sub/b.csv"])),
        "artifact_hash": populated["train_hash"],
        "run": "CLS-1",
        "field": "datasets/train",
    }


def test_directory_xattrs(store: Store, populated: dict[str, str]) -> None:
    tree = Tree(store)
    assert tree.xattrs(tree.root()) == {"version": artifactfs.__version__}
    val = resolve(tree, "ml-team/classification/CLS-1/datasets/val")
    assert val is not None
    assert tree.xattrs(val) == {
        "artifact_hash": populated["val_hash"],
        "file_count": "1",
        "size": str(len(VAL["v.csv"])),
    }
    for path in (
        "ml-team",
        "ml-team/classification",
        "ml-team/classification/CLS-1",
        "ml-team/classification/CLS-1/datasets",
        "ml-team/classification/CLS-1/datasets/train/sub",
    ):
        node = resolve(tree, path)
        assert node is not None
        assert tree.xattrs(node) == {}, path


def test_directory_times_are_the_stores_and_the_same_in_every_mount(
    tmp_path: Path, store: Store, store_path: str, populated: dict[str, str]
) -> None:
    """Inside a run, a directory's mtime comes from the store: the run's creation for the run
    and its field namespaces, the artifact's first storing for every directory of an artifact
    (as its inode comes from the artifact's identity). It was the mount's start: every
    remount changed them, and `rsync`/`tar` saw changed directories."""

    def directory_times(tree: Tree) -> dict[str, int]:
        return {n.path: tree.attributes(n).mtime_ns for n in walk(tree) if n.is_dir}

    def in_runs(times: dict[str, int]) -> dict[str, int]:
        return {path: time for path, time in times.items() if path.count("/") >= 2}

    first_tree = Tree(store)
    first = directory_times(first_tree)
    second_store = Store(store_path)
    try:
        second_tree = Tree(second_store)
        assert second_tree.mounted_ns != first_tree.mounted_ns
        assert in_runs(directory_times(second_tree)) == in_runs(first)
        assert len(in_runs(first)) == 11  # 3 runs, 1 namespace, 7 artifact directories
        in_run = Tree(second_store, run_id="CLS-1")
        in_field = Tree(second_store, run_id="CLS-1", field_path="datasets/train")
        run_times = directory_times(in_run)
        field_times = directory_times(in_field)
    finally:
        second_store.close()

    run = store.get_run("CLS-1")
    train = artifact_of(store_path, "CLS-1", "datasets/train")
    run_time = parse_time(run.created_at)
    train_time = parse_time(train.created_at)
    assert run_time is not None and train_time is not None
    base = "ml-team/classification/CLS-1"
    assert first[base] == first[f"{base}/datasets"] == run_time.timestamp() * 1e9
    for path in ("datasets/train", "datasets/train/sub", "datasets/train/sub/deeper"):
        assert first[f"{base}/{path}"] == train_time.timestamp() * 1e9, path
        assert run_times[path] == first[f"{base}/{path}"], path
        assert (
            field_times[path.removeprefix("datasets/train").lstrip("/")] == first[f"{base}/{path}"]
        )
    assert run_times[""] == first[base]
    # A listing made from a file (a neighbour prefetch's) gives its directories the same time.
    fresh = Tree(store)
    opened = resolve(fresh, f"{base}/datasets/train/a.csv")
    assert opened is not None
    (sub,) = [node for node in fresh.siblings(opened).nodes if node.name == "sub"]
    assert fresh.attributes(sub).mtime_ns == first[f"{base}/datasets/train/sub"]
    # Above the runs, directories change as runs come: they keep the mount's time.
    assert first["ml-team"] == first_tree.mounted_ns


# -- inode numbers -----------------------------------------------------------------------------


def test_inode_for_is_stable_and_never_reserved() -> None:
    assert inode_for("a/b") == inode_for("a/b")
    assert inode_for("a/b") != inode_for("a/c")
    values = {inode_for(f"n{i}") for i in range(5000)}
    assert len(values) == 5000
    assert all(1 < value < 2**63 for value in values)
    assert inode_for("") > ROOT_INODE
    assert inode_for("bad\udcff") == inode_for("bad\udcff")  # surrogate-escaped names


def test_inodes_stable_across_trees_and_distinct(
    tmp_path: Path, store: Store, store_path: str
) -> None:
    files = {f"d{i % 7}/e{i % 3}/f{i}.txt": str(i).encode() for i in range(150)}
    data = make_tree(tmp_path / "many", files)
    for n in range(2):
        run = artifactfs.init_run(project=f"ws/proj{n}", store=store_path)
        run["ns/one"].track_files(str(data))
        run["two"].track_files(str(data / "d1"))

    first = walk(Tree(store))
    assert len(first) > 300
    second_store = Store(store_path)
    try:
        second = walk(Tree(second_store))
    finally:
        second_store.close()
    assert {n.path: n.inode for n in first} == {n.path: n.inode for n in second}
    inodes = [node.inode for node in first]
    assert len(set(inodes)) == len(inodes), "two nodes share an inode number"
    assert [n.path for n in first if n.inode == ROOT_INODE] == [""]
    assert all(0 < inode < 2**64 for inode in inodes)


def test_repointed_field_gets_new_inodes(
    tmp_path: Path, store: Store, store_path: str, populated: dict[str, str]
) -> None:
    tree = Tree(store)
    train_path = "ml-team/classification/CLS-1/datasets/train"
    before = resolve(tree, train_path)
    a_before = resolve(tree, train_path + "/a.csv")
    val_before = resolve(tree, "ml-team/classification/CLS-1/datasets/val")
    assert before is not None and a_before is not None and val_before is not None

    run = artifactfs.init_run(with_id="CLS-1", store=store_path)
    run["datasets/train"].track_files(str(make_tree(tmp_path / "more", {"new.csv": b"new"})))

    after = resolve(tree, train_path)
    assert after is not None
    assert after.artifact_id != before.artifact_id
    assert after.artifact_id == artifact_of(store_path, "CLS-1", "datasets/train").id
    assert tree.xattrs(after)["artifact_hash"] == run["datasets/train"].fetch_hash()
    assert after.inode != before.inode
    a_after = resolve(tree, train_path + "/a.csv")
    assert a_after is not None and a_after.inode != a_before.inode
    assert names(tree.children(after)) == ["a.csv", "new.csv", "sub"]
    # The old artifact is immutable: its nodes still list what they listed.
    assert names(tree.children(before)) == ["a.csv", "sub"]
    # Fields that did not change keep their inodes; so do the nodes above the artifact.
    val_after = resolve(tree, "ml-team/classification/CLS-1/datasets/val")
    assert val_after is not None and val_after.inode == val_before.inode
    assert Tree(store).root().inode == ROOT_INODE


# -- names and rows that must never show ------------------------------------------------------

BAD_NAMES = ["..", ".", "", "a/b", "sub/b.csv", "/", "x\x00y", "a.csv/", "/a.csv", "x" * 256]


def test_unsafe_lookup_names_are_none(store: Store, populated: dict[str, str]) -> None:
    tree = Tree(store)
    nodes = [
        resolve(tree, path)
        for path in (
            "",
            "ml-team",
            "ml-team/classification",
            "ml-team/classification/CLS-1",
            "ml-team/classification/CLS-1/datasets",
            "ml-team/classification/CLS-1/datasets/train",
            "ml-team/classification/CLS-1/datasets/train/sub",
        )
    ]
    for node in nodes:
        assert node is not None
        for name in BAD_NAMES:
            assert tree.lookup(node, name) is None, (node.path, name)
    field_root = Tree(store, run_id="CLS-1", field_path="datasets/train")
    for name in BAD_NAMES:
        assert field_root.lookup(field_root.root(), name) is None, name


HOSTILE_ENTRIES = [
    # (file_path, parent, name): names that look harmless next to paths that are not
    ("../x", "", "x"),
    ("/abs", "", "abs"),
    ("a//b", "a", "b"),
    ("x\x00y", "", "x\x00y"),
    ("z\x00w", "", "w"),
    ("ok/../../esc", "", "ok/../../esc"),
    ("./dot", "", "dot"),
    ("a/../up", "a", "up"),
    ("", "", ""),
    ("y" * 256, "", "y" * 256),
]
HOSTILE_DIRS = [
    ("../d", "", "d"),
    ("/absdir", "", "absdir"),
    ("a//sub", "a", "sub"),
    ("e\x00f", "", "e\x00f"),
    ("g\x00h", "", "h"),
    ("a/../updir", "a", "updir"),
    ("./dotdir", "", "dotdir"),
]
HOSTILE_FIELDS = ["../evil", "/abs", "ns//x", "..", "bad\x00field"]
LEGIT = {"a/ok.txt": b"ok", "top.txt": b"top"}


@pytest.fixture
def hostile(tmp_path: Path, store_path: str) -> str:
    """Run H-1 with field `data` (a/ok.txt, top.txt), then hostile rows in that artifact."""
    data = make_tree(tmp_path / "legit", LEGIT)
    run = artifactfs.init_run(project="hostile", store=store_path, project_key="H")
    run["data"].track_files(str(data))
    artifact_id = artifact_of(store_path, "H-1", "data").id
    body = b"attacker"
    metadata = json.dumps(
        {"file_path": f"file://{tmp_path}/payload", "last_modified": "2024-01-01 00:00:00"}
    )
    conn = sqlite3.connect(store_path)
    try:
        with conn:
            for file_path, parent, name in HOSTILE_ENTRIES:
                conn.execute(
                    "INSERT INTO artifact_entries (artifact_id, file_path, parent, name,"
                    " file_hash, type, size, metadata_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        artifact_id,
                        file_path,
                        parent,
                        name,
                        hashlib.sha1(body).hexdigest(),
                        "Local",
                        len(body),
                        metadata,
                    ),
                )
            for path, parent, name in HOSTILE_DIRS:
                conn.execute(
                    "INSERT INTO artifact_dirs (artifact_id, path, parent, name)"
                    " VALUES (?, ?, ?, ?)",
                    (artifact_id, path, parent, name),
                )
            (run_pk,) = conn.execute("SELECT id FROM runs WHERE run_key = 'H-1'").fetchone()
            for field in HOSTILE_FIELDS:
                conn.execute(
                    "INSERT INTO fields (run_id, path, artifact_id, updated_at)"
                    " VALUES (?, ?, ?, ?)",
                    (run_pk, field, artifact_id, "2024-01-01 00:00:00"),
                )
    finally:
        conn.close()
    return artifact_id


@pytest.mark.parametrize("layout", ["store", "run", "field"])
def test_hostile_rows_never_listed(store: Store, hostile: str, layout: str) -> None:
    tree, prefix = _hostile_tree(store, layout)
    data = resolve(tree, prefix)
    assert data is not None and data.artifact_id == hostile
    assert names(tree.children(data)) == ["a", "top.txt"]
    a = tree.lookup(data, "a")
    assert a is not None
    assert names(tree.children(a)) == ["ok.txt"]
    for node in walk(tree):
        if node.kind is Kind.FILE:
            assert node.entry is not None
            assert node.entry.file_path in LEGIT
        if node.immutable and node.kind is Kind.ARTIFACT_DIR:
            assert node.dir_path in ("", "a")
    if layout != "field":
        run = resolve(tree, prefix.rpartition("/")[0]) if "/" in prefix else tree.root()
        assert run is not None and run.kind is Kind.RUN
        assert names(tree.children(run)) == ["data"]


@pytest.mark.parametrize("layout", ["store", "run", "field"])
def test_hostile_rows_never_looked_up(store: Store, hostile: str, layout: str) -> None:
    tree, prefix = _hostile_tree(store, layout)
    shown = []
    for kind, rows in (("entry", HOSTILE_ENTRIES), ("dir", HOSTILE_DIRS)):
        for stored_path, parent, name in rows:
            node = resolve(tree, "/".join(p for p in (prefix, parent) if p))
            assert node is not None
            found = tree.lookup(node, name)
            if found is not None:
                shown.append(f"{kind} row {stored_path!r} as {found.path!r} ({found.dir_path!r})")
    assert not shown, "lookup() returned hostile rows: " + "; ".join(shown)


def test_hostile_fields_never_looked_up(store: Store, hostile: str) -> None:
    tree = Tree(store, run_id="H-1")
    assert names(tree.children(tree.root())) == ["data"]
    for field in HOSTILE_FIELDS:
        for segment in field.split("/"):
            assert tree.lookup(tree.root(), segment) is None, (field, segment)


def _hostile_tree(store: Store, layout: str) -> tuple[Tree, str]:
    if layout == "store":
        return Tree(store), "default/hostile/H-1/data"
    if layout == "run":
        return Tree(store, run_id="H-1"), "data"
    return Tree(store, run_id="H-1", field_path="data"), ""


# -- reference model ---------------------------------------------------------------------------

SEGMENTS = ["a", "b", "c.txt", "d", "é", "x y"]
paths_strategy = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3).map("/".join)
trees_strategy = st.dictionaries(
    paths_strategy, st.binary(max_size=40), min_size=1, max_size=10
).filter(lambda files: find_file_dir_conflict(files) is None)
probes_strategy = st.lists(
    st.tuples(
        st.sampled_from(["lookup", "children", "attributes"]),
        st.lists(st.sampled_from([*SEGMENTS, "..", ".", "", "a/b", "zz"]), max_size=4),
    ),
    min_size=1,
    max_size=25,
)


class Model:
    """What the tree of an artifact must look like, from the files tracked into it."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.dirs: dict[str, set[str]] = {"": set()}
        for path in files:
            parts = path.split("/")
            for depth in range(len(parts)):
                parent = "/".join(parts[:depth])
                self.dirs.setdefault(parent, set()).add(parts[depth])


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(files=trees_strategy, probes=probes_strategy, layout=st.sampled_from(["store", "field"]))
def test_tree_matches_reference_model(
    files: dict[str, bytes], probes: list[tuple[str, list[str]]], layout: str
) -> None:
    model = Model(files)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_tree(Path(tmp) / "data", files)
        store_path = str(Path(tmp) / "store.db")
        run = artifactfs.init_run(project="ws/proj", store=store_path)
        run["ns/field"].track_files(str(data))
        store = Store(store_path)
        try:
            if layout == "field":
                tree = Tree(store, run_id=run.id, field_path="ns/field")
                base = tree.root()
            else:
                tree = Tree(store)
                found = resolve(tree, f"ws/proj/{run.id}/ns/field")
                assert found is not None
                base = found
            for operation, segments in probes:
                _check_probe(tree, base, model, operation, segments)
        finally:
            store.close()


def _check_probe(tree: Tree, base: Node, model: Model, operation: str, segments: list[str]) -> None:
    node: Node | None = base
    model_path = ""
    model_exists = True
    for segment in segments:
        assert node is not None
        found = tree.lookup(node, segment)
        candidate = f"{model_path}/{segment}" if model_path else segment
        model_exists = (
            model_path in model.dirs
            and segment in model.dirs[model_path]
            and "/" not in segment
            and segment not in ("", ".", "..")
        )
        if not model_exists:
            assert found is None, (model_path, segment)
            return
        assert found is not None, (model_path, segment)
        assert found.name == segment
        node, model_path = found, candidate
    assert node is not None
    is_file = model_path in model.files
    assert (node.kind is Kind.FILE) == is_file
    if operation == "children":
        children = tree.children(node)
        expected = sorted(model.dirs.get(model_path, set())) if not is_file else []
        assert names(children) == expected
        for child in children:
            assert tree.lookup(node, child.name) == child
    elif operation == "attributes":
        attributes = tree.attributes(node)
        if is_file:
            assert attributes.mode == stat.S_IFREG | 0o444
            assert attributes.size == len(model.files[model_path])
            assert tree.xattrs(node)["size"] == str(len(model.files[model_path]))
            assert (
                tree.xattrs(node)["file_hash"] == hashlib.sha1(model.files[model_path]).hexdigest()
            )
        else:
            assert attributes.mode == stat.S_IFDIR | 0o555
    else:
        again = resolve(tree, model_path, base)
        assert again == node and again.inode == node.inode


def test_model_sanity() -> None:
    model = Model({"a/b": b"1", "a/c/d": b"22", "e": b""})
    assert model.dirs == {"": {"a", "e"}, "a": {"b", "c"}, "a/c": {"d"}}
