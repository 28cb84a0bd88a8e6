"""Fetching the neighbours of an opened file before the program asks for them.

Programs that walk a directory of small files (a DataLoader over an image folder, `cat *`,
`rsync`) open them one after another, in name order or close to it. A remote small file costs
a round trip before its first byte; fetching the next few files in parallel while the program
reads the current one hides that latency. Only small remote files are prefetched (one chunk
each). The directory's listing comes from the tree, which remembers it: the program's next
lookups in that directory are then answered without a store query.

Each open costs little: where the listing is remembered (every open but a directory's first),
the neighbours are queued right away, on the caller's thread (the trio loop: queueing starts
fetches, it never waits), and only once half of those queued for that directory were opened:
a program opening files in order then gets its neighbours fetched in batches (the reader
fetches each batch together), not one request per open. Near a directory's end the window
runs on into the next directory of the same parent, in name order (where a program walking
the tree goes next: an image folder's next class), once per directory: without it, the
first files of every directory were read before their fetch had started (measured: 60 of
3,000 reads with one reader, ~180 with eight, each a full round trip; 2 and ~10 with it).
"""

from __future__ import annotations

import bisect
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from cachetools import LRUCache

from artifactfs.entries import TYPE_LOCAL
from artifactfs.fs.tree import Kind, Listing, Node, Tree
from artifactfs.reader import Reader

log = logging.getLogger(__name__)

NEIGHBOURS = 32
# Directories whose queued-up-to position is kept (a few ints each).
REMEMBERED_DIRECTORIES = 4096


class NeighbourPrefetcher:
    def __init__(self, tree: Tree, reader: Reader, neighbours: int = NEIGHBOURS) -> None:
        self.tree = tree
        self.reader = reader
        self.neighbours = neighbours
        # One thread, for a directory's first open: its listing may need a store query.
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="artifactfs-neighbours")
        self._lock = threading.Lock()
        # (directory path, artifact id) -> index in its listing up to which files are queued.
        self._queued_up_to: LRUCache[tuple[str, str], int] = LRUCache(REMEMBERED_DIRECTORIES)
        # Directories whose window already ran on into the next directory.
        self._continued: LRUCache[tuple[str, str], bool] = LRUCache(REMEMBERED_DIRECTORIES)

    def opened(self, node: Node) -> None:
        """Called when a file is opened; returns at once. Only the opening of a small remote
        file (one chunk) is a hint: a program opening a large one (a shard, `file`, `head`)
        is not walking a folder of small files, and its neighbours may be large too."""
        entry = node.entry
        if node.kind is not Kind.FILE or entry is None or entry.type == TYPE_LOCAL:
            return
        if entry.size is None or entry.size > self.reader.chunk_size:
            return
        listing = self.tree.remembered_siblings(node)
        if listing is None:
            self._worker.submit(self._prefetch_after, node)
        else:
            self._queue_after(node, listing)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    def _prefetch_after(self, node: Node) -> None:
        try:
            self._queue_after(node, self.tree.siblings(node))
        except Exception as exc:  # a hint that failed costs nothing but the hint
            log.info("prefetch after %s failed: %s", node.path, exc)

    def _queue_next_directory(self, node: Node, count: int) -> None:
        try:
            listing = self.tree.next_directory(node)
        except Exception as exc:  # a hint that failed costs nothing but the hint
            log.info("prefetch after %s failed: %s", node.path, exc)
            return
        if listing is None or not listing.nodes:
            return
        directory = _directory_key(listing.nodes[0])
        with self._lock:
            if directory in self._queued_up_to:
                return  # the program is there already
        end = self._hand_to_reader(listing.nodes, 0, min(count, len(listing.nodes)))
        if end is None:
            return
        with self._lock:
            self._queued_up_to.setdefault(directory, end)

    def _queue_after(self, node: Node, listing: Listing) -> None:
        position = bisect.bisect_right(listing.names, node.name)
        end = min(position + self.neighbours, len(listing.nodes))
        directory = _directory_key(node)
        spill = position + self.neighbours - len(listing.nodes)
        with self._lock:
            queued = self._queued_up_to.get(directory, 0)
            continuing = spill > 0 and directory not in self._continued
            if continuing:
                self._continued[directory] = True
        if continuing:
            # Near a directory's end, the window runs on into the next directory: a program
            # walking the tree in order opens its first files next, and would wait for them.
            self._worker.submit(self._queue_next_directory, node, spill)
        if position <= queued <= end:
            # Within the window: top it up once half of it was read, so that the reader
            # fetches them in batches rather than one per open.
            if queued == end or queued - position > self.neighbours // 2:
                return
            start = queued
        else:
            start = position  # a jump (a second pass, another order): from the opened file
        taken_to = self._hand_to_reader(listing.nodes, start, end)
        with self._lock:
            self._queued_up_to[directory] = end if taken_to is None else taken_to

    def _hand_to_reader(self, nodes: list[Node], start: int, end: int) -> int | None:
        """Prefetch the files among nodes[start:end]: the index up to which the reader took
        them (`end`, or less when it is busy: the next open asks again from there); None when
        there are no files there."""
        files = [
            (index, sibling.entry)
            for index, sibling in enumerate(nodes[start:end], start)
            if sibling.kind is Kind.FILE and sibling.entry is not None
        ]
        if not files:
            return None
        taken = self.reader.prefetch([entry for _, entry in files])
        return files[taken][0] if taken < len(files) else end


def _directory_key(node: Node) -> tuple[str, str]:
    """(directory path, artifact id) of the directory holding `node`: what the prefetcher
    remembers per directory."""
    return (node.path.rpartition("/")[0], node.artifact_id)
