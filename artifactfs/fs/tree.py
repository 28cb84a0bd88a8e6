"""The mount's directory tree as plain objects: path -> node, attributes, xattrs. No byte I/O.

Layouts: a whole store is `<workspace>/<project>/<RUN-ID>/<field path>/<file_path>`; `--run`
makes one run the root, `--run --field` one artifact. Nodes above an artifact (workspaces,
projects, runs, field namespaces) are read from the store on every lookup, so new runs show up
within the kernel's short entry timeout. Nodes inside an artifact are immutable: their inode
numbers derive from the mount path *and* the artifact hash, so a field pointed at a new artifact
gets new inodes and the kernel may cache the old ones for as long as it likes.

Nothing read from the store is trusted: names that are not a single safe path segment are
left out (and logged), so a hostile store cannot show anything outside the tree.
"""

from __future__ import annotations

import bisect
import enum
import functools
import hashlib
import logging
import stat
import threading
import time
from dataclasses import dataclass, field

from cachetools import LRUCache

from artifactfs import __version__
from artifactfs.entries import ArtifactFileData, parse_time, path_problem
from artifactfs.errors import ArtifactfsError, NotFoundError
from artifactfs.naming import ProjectName, parse_run_id, validate_field_path
from artifactfs.store import ArtifactRecord, RunRecord, Store
from artifactfs.verification import GCS_HASH_KEY

log = logging.getLogger(__name__)

ROOT_INODE = 1
LISTING_CACHE_ENTRIES = 200_000
XATTR_PREFIX = "user.artifactfs."
# Entry metadata shown as extended attributes where an entry has it.
PROVENANCE_KEYS = ("version_id", "generation", GCS_HASH_KEY)


class Kind(enum.Enum):
    ROOT = "root"
    WORKSPACE = "workspace"
    PROJECT = "project"
    RUN = "run"
    NAMESPACE = "namespace"  # a field path prefix: `datasets` of `datasets/train`
    ARTIFACT_DIR = "artifact_dir"  # the artifact's root ('' dir_path) or a directory in it
    FILE = "file"


@dataclass(frozen=True)
class Node:
    kind: Kind
    path: str  # from the mount root, '' for the root
    inode: int
    workspace: str = ""
    project: str = ""
    run_id: str = ""
    field_path: str = ""  # NAMESPACE: the prefix so far; artifact nodes: the whole field
    artifact_id: str = ""
    dir_path: str = ""  # inside the artifact
    entry: ArtifactFileData | None = field(default=None, compare=False)
    # A directory's mtime: inside an artifact (as its inode, from the artifact's identity)
    # when the artifact was first stored; a run's, when it was created; else 0: the mount's.
    # A file carries its directory's, for the directory nodes made from it (`_directory_of`).
    time_ns: int = field(default=0, compare=False)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def is_dir(self) -> bool:
        return self.kind is not Kind.FILE

    @property
    def immutable(self) -> bool:
        """Inside an artifact: the kernel may cache it without limit."""
        return self.kind in (Kind.ARTIFACT_DIR, Kind.FILE)

    @property
    def name_is_final(self) -> bool:
        """Its name leads to this node for good: true inside an artifact, not for an
        artifact's root (its field may be tracked again: the same name, a new artifact)."""
        return self.immutable and (self.dir_path != "" or self.inode == ROOT_INODE)


@dataclass(frozen=True)
class Listing:
    """An artifact directory's children, in name order and by name (shared: never changed)."""

    names: list[str]
    nodes: list[Node]
    by_name: dict[str, Node]


@dataclass(frozen=True)
class Attributes:
    mode: int
    size: int
    mtime_ns: int
    nlink: int


def inode_for(identity: str) -> int:
    """A stable 63-bit inode number for a node identity (never 0 or the root's 1)."""
    digest = hashlib.blake2b(identity.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    value = int.from_bytes(digest, "big") >> 1
    return value if value > ROOT_INODE else value + 2


def _safe_name(name: str) -> bool:
    return "/" not in name and path_problem(name) is None


@functools.lru_cache(maxsize=65536)
def _parse_time(text: str) -> int:
    when = parse_time(text)
    return 0 if when is None else int(when.timestamp()) * 1_000_000_000


MAX_ENTRY_SIZE = 5 * 1024**4  # S3's and GCS's largest object


def _servable(entry: ArtifactFileData) -> bool:
    """Whether a stored entry may be shown: a safe path and a plausible size."""
    if path_problem(entry.file_path) is not None:
        log.warning("hiding entry with an unsafe path %r", entry.file_path)
        return False
    if entry.size is not None and not 0 <= entry.size <= MAX_ENTRY_SIZE:
        log.warning("hiding entry %r with an impossible size %d", entry.file_path, entry.size)
        return False
    return True


def _listing_key(directory: Node) -> tuple[str, str]:
    return directory.path, directory.artifact_id


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class Tree:
    def __init__(self, store: Store, run_id: str | None = None, field_path: str | None = None):
        self.store = store
        self.mounted_ns = time.time_ns()
        self._lock = threading.Lock()
        self._artifacts: LRUCache[str, ArtifactRecord] = LRUCache(maxsize=4096)
        # Listings of artifact directories by (path, artifact id), bounded by entries held.
        self._listings: LRUCache[tuple[str, str], Listing] = LRUCache(
            maxsize=LISTING_CACHE_ENTRIES, getsizeof=lambda listing: max(1, len(listing.nodes))
        )
        if field_path is not None and run_id is None:
            raise ArtifactfsError("--field needs --run")
        if run_id is None:
            self._root = Node(Kind.ROOT, "", ROOT_INODE)
            return
        record = store.get_run(run_id)  # raises NotFoundError with a clear message
        if field_path is None:
            self._root = Node(
                Kind.RUN,
                "",
                ROOT_INODE,
                record.project.workspace,
                record.project.name,
                record.run_id,
                time_ns=_parse_time(record.created_at),
            )
            return
        validate_field_path(field_path)
        artifact = store.field_artifact(record, field_path)
        self._root = Node(
            Kind.ARTIFACT_DIR,
            "",
            ROOT_INODE,
            record.project.workspace,
            record.project.name,
            record.run_id,
            field_path,
            artifact.id,
            time_ns=_parse_time(artifact.created_at),
        )

    def root(self) -> Node:
        return self._root

    # -- navigation -------------------------------------------------------------------------

    def lookup(self, parent: Node, name: str) -> Node | None:
        if not _safe_name(name):
            return None
        if parent.kind is Kind.ARTIFACT_DIR:
            return self._artifact_lookup(parent, name)
        if parent.kind is Kind.PROJECT:
            return self._run_lookup(parent, name)
        for child in self.children(parent):
            if child.name == name:
                return child
        return None

    def remembered_lookup(self, parent: Node, name: str) -> tuple[bool, Node | None]:
        """(True, the child or None) when the parent's listing is remembered, answered
        without a store query or a wait; (False, None) when `lookup` must be called."""
        if parent.kind is not Kind.ARTIFACT_DIR:
            return False, None
        with self._lock:
            listed = self._listings.get(_listing_key(parent))
        if listed is None:
            return False, None
        return True, listed.by_name.get(name) if _safe_name(name) else None

    def children(self, node: Node) -> list[Node]:
        if node.kind is Kind.ROOT:
            workspaces = sorted({p.workspace for p in self.store.list_projects()})
            return [self._workspace(ws) for ws in workspaces if _safe_name(ws)]
        if node.kind is Kind.WORKSPACE:
            return [
                self._project(node, p)
                for p in self.store.list_projects()
                if p.workspace == node.workspace and _safe_name(p.name)
            ]
        if node.kind is Kind.PROJECT:
            runs = self.store.list_runs(ProjectName(node.workspace, node.project))
            return [self._run(node, run) for run in runs if _safe_name(run.run_id)]
        if node.kind in (Kind.RUN, Kind.NAMESPACE):
            return self._field_children(node)
        if node.kind is Kind.ARTIFACT_DIR:
            return self._artifact_children(node)
        return []

    def _run_lookup(self, parent: Node, name: str) -> Node | None:
        """One run by name, without listing the project's (possibly many) runs."""
        try:
            parse_run_id(name)
        except ArtifactfsError:  # not a run id: no such entry
            return None
        try:
            record = self.store.get_run(name)
        except NotFoundError:
            return None  # any other failure (a damaged store, one out of reach) is EIO
        # The store forgives spaces around an id ("PRJ-1 "); a name in the mount is exact,
        # or one run would answer to many names the listing never shows.
        if record.run_id != name:
            return None
        if record.project != ProjectName(parent.workspace, parent.project):
            return None
        return self._run(parent, record)

    def _workspace(self, workspace: str) -> Node:
        return Node(Kind.WORKSPACE, workspace, inode_for(workspace), workspace)

    def _project(self, parent: Node, project: ProjectName) -> Node:
        path = _join(parent.path, project.name)
        return Node(Kind.PROJECT, path, inode_for(path), project.workspace, project.name)

    def _run(self, parent: Node, run: RunRecord) -> Node:
        path = _join(parent.path, run.run_id)
        return Node(
            Kind.RUN,
            path,
            inode_for(path),
            parent.workspace,
            parent.project,
            run.run_id,
            time_ns=_parse_time(run.created_at),
        )

    def _field_children(self, node: Node) -> list[Node]:
        """Field namespaces and artifact roots directly below a run or a namespace."""
        fields = self.store.run_fields(node.run_id) or {}
        prefix = node.field_path + "/" if node.field_path else ""
        found: dict[str, Node] = {}
        for field_path, (artifact_id, created_at) in sorted(fields.items()):
            if not field_path.startswith(prefix) or path_problem(field_path):
                continue
            rest = field_path[len(prefix) :]
            name = rest.split("/", 1)[0]
            path = _join(node.path, name)
            common = (node.workspace, node.project, node.run_id, prefix + name)
            if rest == name:
                identity = f"{path}\0{artifact_id}"
                found[name] = Node(
                    Kind.ARTIFACT_DIR,
                    path,
                    inode_for(identity),
                    *common,
                    artifact_id,
                    time_ns=_parse_time(created_at),
                )
            elif name not in found:
                found[name] = Node(
                    Kind.NAMESPACE, path, inode_for(path), *common, time_ns=node.time_ns
                )
        return [found[name] for name in sorted(found)]

    def _artifact_node(self, parent: Node, name: str, item: ArtifactFileData | str) -> Node:
        path = _join(parent.path, name)
        identity = f"{path}\0{parent.artifact_id}"
        common = (parent.workspace, parent.project, parent.run_id, parent.field_path)
        if isinstance(item, str):
            return Node(
                Kind.ARTIFACT_DIR,
                path,
                inode_for(identity),
                *common,
                parent.artifact_id,
                item,
                time_ns=parent.time_ns,
            )
        return Node(
            Kind.FILE,
            path,
            inode_for(identity),
            *common,
            parent.artifact_id,
            item.file_path,
            item,
            time_ns=parent.time_ns,  # not its own (that is the entry's): its directory's
        )

    def _artifact_lookup(self, parent: Node, name: str) -> Node | None:
        known, node = self.remembered_lookup(parent, name)
        if known:  # listed before (readdir, or a neighbour's open): no query
            return node
        entry, dir_path = self.store.artifact_lookup(parent.artifact_id, parent.dir_path, name)
        if entry is not None and dir_path is not None:
            log.warning("hiding %r: both a file and a directory in the store", name)
            return None
        if entry is not None:
            if entry.file_path != _join(parent.dir_path, name) or not _servable(entry):
                return None
            return self._artifact_node(parent, name, entry)
        if dir_path is None:
            return None
        if path_problem(dir_path) or dir_path != _join(parent.dir_path, name):
            log.warning("hiding entry with an unsafe path %r", dir_path)
            return None
        return self._artifact_node(parent, name, dir_path)

    def remembered_children(self, node: Node) -> list[Node] | None:
        """The listing of an artifact directory if it is remembered: no store query, no wait.
        The list is shared: callers must not change it."""
        if node.kind is not Kind.ARTIFACT_DIR:
            return None
        with self._lock:
            listed = self._listings.get(_listing_key(node))
        return None if listed is None else listed.nodes

    def _artifact_children(self, node: Node) -> list[Node]:
        return self._artifact_listing(node).nodes

    def _artifact_listing(self, node: Node) -> Listing:
        # A directory inside an artifact never changes: its listing is remembered (bounded).
        with self._lock:
            listed = self._listings.get(_listing_key(node))
        if listed is not None:
            return listed
        dirs, files = self.store.artifact_children(node.artifact_id, node.dir_path)
        children: dict[str, Node] = {}
        for dir_path in dirs:
            name = dir_path.rsplit("/", 1)[-1]
            if path_problem(dir_path) is None and _safe_name(name):
                children.setdefault(name, self._artifact_node(node, name, dir_path))
        both = set()
        for entry in files:
            name = entry.file_path.rsplit("/", 1)[-1]
            if not _servable(entry):
                continue
            if name in children and children[name].kind is Kind.ARTIFACT_DIR:
                both.add(name)  # a store written by hand: tracking never allows this
                continue
            children.setdefault(name, self._artifact_node(node, name, entry))
        for name in both:
            log.warning("hiding %r: both a file and a directory in the store", name)
            del children[name]
        names = sorted(children)
        listing = Listing(names, [children[name] for name in names], children)
        with self._lock:
            self._listings[_listing_key(node)] = listing
        return listing

    def siblings(self, node: Node) -> Listing:
        """The listing of the artifact directory that holds `node`; remembered, so that the
        lookups of a program opening its files one by one need no query."""
        return self._artifact_listing(self._directory_of(node))

    def next_directory(self, node: Node) -> Listing | None:
        """The listing of the directory after the one holding `node`, in its parent's name
        order (where a program walking the artifact in order goes next); None when the
        parent has no directory after it, or `node` is at the artifact's root."""
        directory = self._directory_of(node)
        if directory.dir_path == "":
            return None
        around = self.siblings(directory)
        for candidate in around.nodes[bisect.bisect_right(around.names, directory.name) :]:
            if candidate.kind is Kind.ARTIFACT_DIR:
                return self._artifact_listing(candidate)
        return None

    @staticmethod
    def parent_inode(node: Node) -> int:
        """The inode of the directory holding `node` (the root's is the root), from the node
        alone: the parent need not be remembered."""
        if node.inode == ROOT_INODE:
            return ROOT_INODE
        if node.immutable and node.dir_path != "":  # inside an artifact, below its root
            return Tree._directory_of(node).inode
        parent_path = node.path.rpartition("/")[0]
        return inode_for(parent_path) if parent_path else ROOT_INODE

    @staticmethod
    def _directory_of(node: Node) -> Node:
        """The artifact directory holding `node`."""
        path = node.path.rpartition("/")[0]
        return Node(
            Kind.ARTIFACT_DIR,
            path,
            ROOT_INODE if path == "" else inode_for(f"{path}\0{node.artifact_id}"),
            node.workspace,
            node.project,
            node.run_id,
            node.field_path,
            node.artifact_id,
            node.dir_path.rpartition("/")[0],
            time_ns=node.time_ns,  # one artifact: one time
        )

    def remembered_siblings(self, node: Node) -> Listing | None:
        """`siblings` if that listing is remembered (no store query, no wait), else None."""
        with self._lock:
            return self._listings.get((node.path.rpartition("/")[0], node.artifact_id))

    # -- attributes -------------------------------------------------------------------------

    def attributes(self, node: Node) -> Attributes:
        if node.kind is Kind.FILE:
            assert node.entry is not None
            size = node.entry.size if node.entry.size and node.entry.size > 0 else 0
            mtime = _parse_time(node.entry.metadata.get("last_modified", ""))
            return Attributes(stat.S_IFREG | 0o444, size, mtime, 1)
        return Attributes(stat.S_IFDIR | 0o555, 0, node.time_ns or self.mounted_ns, 2)

    def _artifact(self, node: Node) -> ArtifactRecord:
        with self._lock:
            artifact = self._artifacts.get(node.artifact_id)
        if artifact is None:
            artifact = self.store.artifact(node.artifact_id)
            if artifact is None:
                raise NotFoundError(f"artifact {node.artifact_id} is missing from the store")
            with self._lock:  # artifacts never change: remember them
                self._artifacts[node.artifact_id] = artifact
        return artifact

    def xattrs(self, node: Node) -> dict[str, str]:
        """Extended attributes without the `user.artifactfs.` prefix (cache figures aside)."""
        if node.kind is Kind.FILE:
            assert node.entry is not None
            entry = node.entry
            attributes = {
                "file_hash": entry.file_hash,
                "type": entry.type,
                "source": entry.source_url,
                "last_modified": entry.metadata.get("last_modified", ""),
                "size": "" if entry.size is None else str(entry.size),
                "artifact_hash": self._artifact(node).hash,
                "run": node.run_id,
                "field": node.field_path,
            }
            # Which version of the object was tracked (what `aws s3api get-object
            # --version-id` or `gsutil cp gs://b/o#GENERATION` needs), and what the hash is.
            for key in PROVENANCE_KEYS:
                if entry.metadata.get(key):
                    attributes[key] = str(entry.metadata[key])
            return attributes
        values: dict[str, str] = {}
        if node.kind is Kind.ARTIFACT_DIR and node.dir_path == "":
            artifact = self._artifact(node)
            values["artifact_hash"] = artifact.hash
            values["file_count"] = str(artifact.file_count)
            values["size"] = str(artifact.total_size)
        if node.inode == ROOT_INODE:  # with --run --field, also an artifact's root
            values["version"] = __version__
        return values
