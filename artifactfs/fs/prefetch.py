"""Fetching the neighbours of an opened file before the program asks for them.

Programs that walk a directory of small files (a DataLoader over an image folder, `cat *`,
`rsync`) open them one after another, in name order or close to it. A remote small file costs
a round trip before its first byte; fetching the next few files in parallel while the program
reads the current one hides that latency. Only small remote files are prefetched (one chunk
each); each directory's listing is read from the store once and remembered for a while.
"""

from __future__ import annotations

import bisect
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from cachetools import LRUCache

from artifactfs.entries import TYPE_LOCAL, ArtifactFileData
from artifactfs.fs.tree import Kind, Node, Tree
from artifactfs.reader import Reader

log = logging.getLogger(__name__)

NEIGHBOURS = 32
REMEMBERED_DIRECTORIES = 256


class NeighbourPrefetcher:
    def __init__(self, tree: Tree, reader: Reader, neighbours: int = NEIGHBOURS) -> None:
        self.tree = tree
        self.reader = reader
        self.neighbours = neighbours
        self._listings: LRUCache[tuple[str, str], tuple[list[str], list[ArtifactFileData]]] = (
            LRUCache(maxsize=REMEMBERED_DIRECTORIES)
        )
        self._lock = threading.Lock()
        # One thread: it only reads listings and queues fetches on the reader's prefetch pool.
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="artifactfs-neighbours")

    def opened(self, node: Node) -> None:
        """Called when a file is opened; returns at once."""
        if node.kind is not Kind.FILE or node.entry is None or node.entry.type == TYPE_LOCAL:
            return
        self._worker.submit(self._prefetch_after, node)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    def _listing(self, node: Node) -> tuple[list[str], list[ArtifactFileData]]:
        key = (node.artifact_id, node.dir_path.rpartition("/")[0])
        with self._lock:
            found = self._listings.get(key)
        if found is None:
            files = self.tree.sibling_files(node)
            found = ([entry.file_path for entry in files], files)
            with self._lock:
                self._listings[key] = found
        return found

    def _prefetch_after(self, node: Node) -> None:
        try:
            paths, files = self._listing(node)
            position = bisect.bisect_right(paths, node.dir_path)
            for entry in files[position : position + self.neighbours]:
                self.reader.prefetch(entry)
        except Exception as exc:  # a hint that failed costs nothing but the hint
            log.info("prefetch after %s failed: %s", node.path, exc)
