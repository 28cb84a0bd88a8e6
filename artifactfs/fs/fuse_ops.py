"""pyfuse3 operations: a thin translator from kernel requests to `Tree` and `Reader` calls.

Everything that may block (store queries, fetches, disk reads) runs on worker threads through
bounded limiters (one for the store's calls, which also have a deadline: `_store_call`), so a
slow fetch or store never stalls the trio loop that serves other readers. Exceptions become
errno values in one place (`_on_thread`): ReadError is EIO with a log line, a store that cannot
be reached is EIO too, and every path that would write is EROFS.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import pyfuse3
import trio
from cachetools import LRUCache

from artifactfs.fs.prefetch import NeighbourPrefetcher
from artifactfs.fs.tree import ROOT_INODE, XATTR_PREFIX, Kind, Node, Tree
from artifactfs.reader import FETCH_WAIT_MARGIN, Reader, ReadError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Inside an artifact nothing ever changes; above it, new runs must show up within seconds.
IMMUTABLE_TIMEOUT = 3600.0
LISTING_TIMEOUT = 1.0
WORKER_THREADS = 16
STORE_THREADS = 8  # the store's calls (lookups, listings, attributes): a limiter of their own
ATTRIBUTE_CACHE_NODES = 200_000
# Entries of artifact directories kept ready to list again (name bytes, attributes, node).
PREPARED_LISTING_ENTRIES = 200_000

# One listing entry as readdir replies it.
Prepared = tuple[bytes, pyfuse3.EntryAttributes, Node]
# `.` and `..`, replied before the children: readdir offsets 1 and 2; child i gets DOTS + i + 1.
DOTS = 2
STATFS_BLOCK = 128 * 1024  # the block size statfs reports (as the cache's size and use)


class ArtifactOperations(pyfuse3.Operations):
    def __init__(self, tree: Tree, reader: Reader) -> None:
        super().__init__()
        self.tree = tree
        self.reader = reader
        self.prefetcher = NeighbourPrefetcher(tree, reader)
        self._limiter = trio.CapacityLimiter(WORKER_THREADS)
        # The store's calls have threads of their own: a store that stops answering leaves
        # them blocked (abandoned, they keep their place until the answer comes), and the
        # reads of files must not wait behind them.
        self._store_limiter = trio.CapacityLimiter(STORE_THREADS)
        self._nodes: dict[int, Node] = {ROOT_INODE: tree.root()}
        self._lookups: dict[int, int] = {}
        self._open_files: dict[int, Node] = {}
        self._listings: dict[int, list[Prepared]] = {}
        self._dots: dict[int, list[tuple[bytes, pyfuse3.EntryAttributes]]] = {}
        # A warm `find -ls` lists every directory again: inside an artifact nothing changes,
        # so each listing is prepared once (bounded by entries, not directories).
        self._prepared_listings: LRUCache[int, list[Prepared]] = LRUCache(
            maxsize=PREPARED_LISTING_ENTRIES, getsizeof=len
        )
        self._attribute_cache: LRUCache[int, pyfuse3.EntryAttributes] = LRUCache(
            maxsize=ATTRIBUTE_CACHE_NODES
        )
        self._next_handle = 1
        self._uid = os.getuid()
        self._gid = os.getgid()

    # -- plumbing ---------------------------------------------------------------------------

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        """Run blocking work on a worker thread; map failures to errno."""
        return await self._on_thread(function, args, self._limiter)

    async def _store_call(self, function: Callable[..., T], *args: Any) -> T:
        """`_call` for work that asks the store: EIO if no answer comes within the read
        deadline. A PostgreSQL server that stops answering (frozen, a network that drops
        packets) otherwise held every lookup, and the programs waiting on it, for good."""
        try:
            with trio.fail_after(self.reader.deadline):
                return await self._on_thread(function, args, self._store_limiter)
        except trio.TooSlowError:
            log.error(
                "EIO: %s: no answer from the store %s within %gs",
                getattr(function, "__name__", function),
                self.tree.store.uri,
                self.reader.deadline,
            )
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def _on_thread(
        self, function: Callable[..., T], args: tuple[Any, ...], limiter: trio.CapacityLimiter
    ) -> T:
        try:
            # Abandoned when the mount stops (SIGTERM): a thread blocked on a server that
            # does not answer cannot be interrupted, and must not hold the unmount.
            return await trio.to_thread.run_sync(
                function, *args, limiter=limiter, abandon_on_cancel=True
            )
        except pyfuse3.FUSEError:
            raise
        except ReadError as exc:  # the message names the source and the reason
            log.error("EIO: %s", exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception as exc:
            log.error(
                "%s failed: %s: %s",
                getattr(function, "__name__", function),
                type(exc).__name__,
                exc,
            )
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _node(self, inode: int) -> Node:
        node = self._nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _remember(self, node: Node) -> None:
        self._nodes[node.inode] = node
        self._lookups[node.inode] = self._lookups.get(node.inode, 0) + 1

    def _new_handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    def _entry_attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        if _size_untracked(node):
            return self._build_attributes(node)  # its size comes from the source: not kept
        if node.immutable:
            # Built once per node: a warm `find -ls` replies with thousands of these, and the
            # attributes of a node inside an artifact never change (pyfuse3 copies them out).
            cached = self._attribute_cache.get(node.inode)
            if cached is None:
                cached = self._attribute_cache[node.inode] = self._build_attributes(node)
            return cached
        return self._build_attributes(node)

    def _build_attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attributes = self.tree.attributes(node)
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = node.inode
        entry.generation = 0
        # An artifact's root never changes, but the name leading to it does when its field
        # is tracked again: that name is looked up again as often as a listing is.
        entry.entry_timeout = IMMUTABLE_TIMEOUT if node.name_is_final else LISTING_TIMEOUT
        entry.attr_timeout = IMMUTABLE_TIMEOUT if node.immutable else LISTING_TIMEOUT
        size = attributes.size
        if _size_untracked(node):
            # Tracked without a size: the source's, once learned. Until then the kernel keeps
            # none of these attributes: its next stat comes here (getattr learns the size).
            assert node.entry is not None
            learned = self.reader.known_size(node.entry)
            size = learned or 0
            entry.attr_timeout = 0 if learned is None else LISTING_TIMEOUT
        entry.st_mode = attributes.mode
        entry.st_nlink = attributes.nlink
        entry.st_uid = self._uid
        entry.st_gid = self._gid
        entry.st_rdev = 0
        entry.st_size = size
        entry.st_blksize = 128 * 1024
        entry.st_blocks = -(-size // 512)
        entry.st_atime_ns = attributes.mtime_ns
        entry.st_mtime_ns = attributes.mtime_ns
        entry.st_ctime_ns = attributes.mtime_ns
        return entry

    # -- names and attributes ---------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        text = os.fsdecode(name)
        if text == ".":
            return self._entry_attributes(parent)
        # Inside a listed directory the answer is a dict lookup: no round trip to a worker
        # thread, which costs more than the lookup when fetch threads keep the GIL busy.
        known, node = self.tree.remembered_lookup(parent, text)
        if not known:
            node = await self._store_call(self.tree.lookup, parent, text)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        self._remember(node)
        await self._learn_size(node)
        return self._entry_attributes(node)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        await self._learn_size(node)
        return self._entry_attributes(node)

    async def _learn_size(self, node: Node) -> None:
        """For a file tracked without a size: ask its source, once (stat shows 0 if it
        cannot answer; a read then fails with EIO)."""
        if _size_untracked(node):
            assert node.entry is not None
            if self.reader.known_size(node.entry) is None:
                with contextlib.suppress(pyfuse3.FUSEError):
                    await self._call(self.reader.sized, node.entry)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            left = self._lookups.get(inode, 0) - count
            if left > 0:
                self._lookups[inode] = left
            elif inode != ROOT_INODE:
                self._lookups.pop(inode, None)
                if inode not in {n.inode for n in self._open_files.values()}:
                    self._nodes.pop(inode, None)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        handle = self._new_handle()
        # One listing per open: paging through it stays consistent while runs are added.
        prepared = self._prepared_listings.get(inode) if node.immutable else None
        if prepared is None:
            # A remembered listing is served here, without the round trip to a worker thread.
            listing = self.tree.remembered_children(node)
            if listing is None:
                listing = await self._store_call(self.tree.children, node)
            prepared = [
                (os.fsencode(child.name), self._entry_attributes(child), child) for child in listing
            ]
            if node.immutable and len(prepared) <= PREPARED_LISTING_ENTRIES:
                self._prepared_listings[inode] = prepared
        self._listings[handle] = prepared
        self._dots[handle] = self._dot_entries(node)
        return handle

    def _dot_entries(self, directory: Node) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        """`.` and `..` (the root's parent is itself) as `ls -a` expects them. Every directory
        has the same attributes but its inode; the kernel takes only the inode and type of
        these two, and never counts them as lookups: they are not remembered."""
        parent = self._build_attributes(directory)  # a copy: the cached one is shared
        parent.st_ino = self.tree.parent_inode(directory)
        return [(b".", self._entry_attributes(directory)), (b"..", parent)]

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # The offset after each entry is its place in `.`, `..`, children: a listing read
        # in several calls resumes where the last one stopped.
        dots = self._dots.get(fh, [])
        for index in range(start_id, len(dots)):
            name, attributes = dots[index]
            if not pyfuse3.readdir_reply(token, name, attributes, index + 1):
                return
        listing = self._listings.get(fh, [])
        for index in range(max(start_id - DOTS, 0), len(listing)):
            name, attributes, child = listing[index]
            if not pyfuse3.readdir_reply(token, name, attributes, DOTS + index + 1):
                return
            self._remember(child)

    async def releasedir(self, fh: int) -> None:
        self._listings.pop(fh, None)
        self._dots.pop(fh, None)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = STATFS_BLOCK
        data.f_frsize = STATFS_BLOCK
        data.f_namemax = 255
        # The cache's size and use, as CernVM-FS reports them: `df` then shows the mount (it
        # hides a file system of no blocks) and how full its cache is.
        limit = self.reader.cache.limit
        used = min(self.reader.cache.stats.cache_bytes, limit)
        data.f_blocks = limit // STATFS_BLOCK
        data.f_bfree = data.f_bavail = (limit - used) // STATFS_BLOCK
        return data

    # -- reading ----------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.kind is not Kind.FILE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        # O_APPEND alone writes nothing: a read-only file system opens it for reading.
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EROFS)
        handle = self._new_handle()
        self._open_files[handle] = node
        self.prefetcher.opened(node)
        if _size_untracked(node):
            # The kernel's idea of its size may be 0 still: every read comes here instead.
            return pyfuse3.FileInfo(fh=handle, direct_io=True)
        # The bytes behind an inode never change: keep the page cache across opens.
        return pyfuse3.FileInfo(fh=handle, keep_cache=True)

    # pyfuse3 replies with any buffer (its stub says bytes): a view saves a copy per read.
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        node = self._open_files.get(fh)
        if node is None or node.entry is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        # Bytes already checked and in memory (a prefetched small file) are answered here;
        # so are those of a fetch under way (a prefetch, a read-ahead), once it ends: waited
        # for on the trio loop, which costs no worker thread and no thread hand-off.
        ready = self.reader.read_if_ready(node.entry, off, size)
        if ready is not None:
            return ready
        under_way = self.reader.fetch_under_way(node.entry, off, size)
        if under_way is not None:
            if not await _finished(under_way, self.reader.deadline + FETCH_WAIT_MARGIN):
                await self._call(self.reader.give_up_waiting, node.entry, off)  # EIO
            ready = self.reader.read_if_ready(node.entry, off, size)
            if ready is not None:
                return ready
        # Anything else (disk reads, failures to tell) on a worker thread.
        return await self._call(self.reader.read, node.entry, off, size)

    async def release(self, fh: int) -> None:
        self._open_files.pop(fh, None)

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        self._node(inode)
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    # -- extended attributes ----------------------------------------------------------------

    def _all_xattrs(self, node: Node) -> dict[str, str]:
        values = self.tree.xattrs(node)
        if node.kind is Kind.FILE and node.entry is not None:
            values["cached"] = str(self.reader.cached_bytes(node.entry))
        if _size_untracked(node):
            assert node.entry is not None
            learned = self.reader.known_size(node.entry)  # as stat shows it, once learned
            if learned is not None:
                values["size"] = str(learned)
        if node.inode == ROOT_INODE:
            snapshot = self.reader.cache.snapshot()
            for key in ("cache_bytes", "cache_limit", "hits", "misses", "fetched_bytes", "errors"):
                values[key] = str(snapshot[key])
        return {XATTR_PREFIX + key: value for key, value in values.items()}

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        text = os.fsdecode(name)
        if not text.startswith(XATTR_PREFIX):  # security.*, system.posix_acl_*: `ls -l` asks
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        values = await self._store_call(self._all_xattrs, self._node(inode))
        value = values.get(text)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value.encode("utf-8", "surrogateescape")

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        values = await self._store_call(self._all_xattrs, self._node(inode))
        return [name.encode("utf-8") for name in values]

    # -- everything that would write: read-only file system ---------------------------------

    async def setxattr(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def setattr(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mknod(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mkdir(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def unlink(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rmdir(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def symlink(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rename(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def link(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def create(self, *args: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def write(self, *args: Any) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)


async def _finished(future: Future[Any], timeout: float) -> bool:
    """Wait until `future` is done (it runs on some pool): True, or False after `timeout`."""
    if future.done():
        return True
    done = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def wake(_: Future[Any]) -> None:
        with contextlib.suppress(trio.RunFinishedError):  # the mount is going away
            token.run_sync_soon(done.set)

    future.add_done_callback(wake)
    with trio.move_on_after(timeout):
        await done.wait()
    return future.done()


def _size_untracked(node: Node) -> bool:
    """A file whose entry has no size (an imported one may not)."""
    return node.kind is Kind.FILE and node.entry is not None and node.entry.size is None
