"""Fetching the neighbours of an opened file before the program asks for them.

Programs that walk a directory of small files (a DataLoader over an image folder, `cat *`,
`rsync`) open them one after another, in name order or close to it. A remote small file costs
a round trip before its first byte; fetching the next few files in parallel while the program
reads the current one hides that latency. Only small remote files are prefetched (one chunk
each). The directory's listing comes from the tree, which remembers it: the program's next
lookups in that directory are then answered without a store query.

Each open costs little: where the listing is remembered (every open but a directory's first),
the neighbours are queued right away, on the caller's thread (the trio loop: queueing starts
fetches, it never waits), and only those past the ones already queued for that directory, so
a program opening files in order adds one neighbour per open, not `neighbours`.
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

    def opened(self, node: Node) -> None:
        """Called when a file is opened; returns at once."""
        if node.kind is not Kind.FILE or node.entry is None or node.entry.type == TYPE_LOCAL:
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

    def _queue_after(self, node: Node, listing: Listing) -> None:
        position = bisect.bisect_right(listing.names, node.name)
        end = min(position + self.neighbours, len(listing.nodes))
        directory = (node.path.rpartition("/")[0], node.artifact_id)
        with self._lock:
            queued = self._queued_up_to.get(directory, 0)
        # Within the window, go on from where the last open stopped; a jump (a second pass
        # over the directory, another order) starts again from the opened file.
        start = queued if position <= queued <= end else position
        for index in range(start, end):
            sibling = listing.nodes[index]
            if sibling.kind is not Kind.FILE or sibling.entry is None:
                continue
            if not self.reader.prefetch(sibling.entry):
                end = index  # the reader is busy: the next open asks again from here
                break
        with self._lock:
            self._queued_up_to[directory] = end
