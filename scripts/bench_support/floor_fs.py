"""A bare pyfuse3 file system: a directory passed through, read-only, and nothing else.

    python floor_fs.py SOURCE MOUNTPOINT

The benchmark mounts the bucket's directory on tmpfs with it: what a daemon built on pyfuse3,
as artifactfs is, does at best when the bytes are already in memory. No fetch, no cache, no
check: each request is at most one system call on tmpfs (a directory is listed once), answered
on the trio loop. It is mounted as artifactfs mounts (pyfuse3's default options and `ro`,
hour-long entry and attribute timeouts, the page cache kept across opens, 128 KiB
`st_blksize`; the benchmark gives it the same 1 MiB read-ahead), so its figures are the floor
under artifactfs's FUSE layer on this machine. It is a measuring stick, not a file system to
use: inodes are tmpfs's own, never forgotten, listings never refreshed.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio

TIMEOUT = 3600.0
BLOCK_SIZE = 128 * 1024
READ_ONLY = ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


def _attributes(st: os.stat_result, inode: int) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = inode
    entry.entry_timeout = TIMEOUT
    entry.attr_timeout = TIMEOUT
    entry.st_mode = st.st_mode & READ_ONLY
    entry.st_nlink = st.st_nlink
    entry.st_uid = st.st_uid
    entry.st_gid = st.st_gid
    entry.st_size = st.st_size
    entry.st_blksize = BLOCK_SIZE
    entry.st_blocks = st.st_blocks
    entry.st_atime_ns = st.st_atime_ns
    entry.st_mtime_ns = st.st_mtime_ns
    entry.st_ctime_ns = st.st_ctime_ns
    return entry


class PassThrough(pyfuse3.Operations):
    def __init__(self, source: str) -> None:
        super().__init__()
        self._paths: dict[int, str] = {pyfuse3.ROOT_INODE: source}
        self._root_ino = os.lstat(source).st_ino
        self._listings: dict[int, list[tuple[bytes, pyfuse3.EntryAttributes]]] = {}

    def _inode(self, st: os.stat_result, path: str) -> int:
        inode = pyfuse3.ROOT_INODE if st.st_ino == self._root_ino else st.st_ino
        self._paths.setdefault(inode, path)
        return inode

    def _path(self, inode: int) -> str:
        try:
            return self._paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = os.path.join(self._path(parent_inode), os.fsdecode(name))
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        return _attributes(st, self._inode(st, path))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            return _attributes(os.lstat(self._path(inode)), inode)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        # Listed once, then answered from memory, as artifactfs answers an artifact's tree.
        if inode not in self._listings:
            try:
                self._listings[inode] = self._list(self._path(inode))
            except OSError as exc:
                raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        return inode

    def _list(self, path: str) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        listing = []
        with os.scandir(path) as entries:
            for dirent in sorted(entries, key=lambda e: e.name):
                st = dirent.stat(follow_symlinks=False)
                inode = self._inode(st, dirent.path)
                listing.append((os.fsencode(dirent.name), _attributes(st, inode)))
        return listing

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._listings[fh]
        for index in range(start_id, len(listing)):
            name, attributes = listing[index]
            if not pyfuse3.readdir_reply(token, name, attributes, index + 1):
                return

    async def releasedir(self, fh: int) -> None:
        pass  # the listing stays: the tree does not change during a benchmark

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        try:
            fd = os.open(self._path(inode), os.O_RDONLY)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    async def release(self, fh: int) -> None:
        os.close(fh)


def main() -> None:
    source, mountpoint = sys.argv[1:3]
    options = set(pyfuse3.default_options) | {"fsname=floor", "subtype=pyfuse3floor", "ro"}
    pyfuse3.init(PassThrough(os.path.abspath(source)), mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
