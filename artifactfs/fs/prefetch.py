"""Fetching the neighbours of an opened file before the program asks for them.

Programs that walk a directory of small files (a DataLoader over an image folder, `cat *`,
`rsync`) open them one after another, in name order or close to it. A remote small file costs
a round trip before its first byte; fetching the next few files in parallel while the program
reads the current one hides that latency. Only small remote files are prefetched (one chunk
each). The directory's listing comes from the tree, which remembers it: the program's next
lookups in that directory are then answered without a store query.
"""

from __future__ import annotations

import bisect
import logging
from concurrent.futures import ThreadPoolExecutor

from artifactfs.entries import TYPE_LOCAL
from artifactfs.fs.tree import Kind, Node, Tree
from artifactfs.reader import Reader

log = logging.getLogger(__name__)

NEIGHBOURS = 32


class NeighbourPrefetcher:
    def __init__(self, tree: Tree, reader: Reader, neighbours: int = NEIGHBOURS) -> None:
        self.tree = tree
        self.reader = reader
        self.neighbours = neighbours
        # One thread: it only reads listings and queues fetches on the reader's prefetch pool.
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="artifactfs-neighbours")

    def opened(self, node: Node) -> None:
        """Called when a file is opened; returns at once."""
        if node.kind is not Kind.FILE or node.entry is None or node.entry.type == TYPE_LOCAL:
            return
        self._worker.submit(self._prefetch_after, node)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    def _prefetch_after(self, node: Node) -> None:
        try:
            listing = self.tree.siblings(node)
            position = bisect.bisect_right(listing.names, node.name)
            for sibling in listing.nodes[position : position + self.neighbours]:
                if sibling.kind is Kind.FILE and sibling.entry is not None:
                    self.reader.prefetch(sibling.entry)
        except Exception as exc:  # a hint that failed costs nothing but the hint
            log.info("prefetch after %s failed: %s", node.path, exc)
