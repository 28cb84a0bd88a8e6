"""Remembered SHA-1s of local files, keyed by absolute path, size, mtime and ctime (ns).

ctime is in the key because mtime alone can be set back (`cp -p`, `rsync -t`, `tar x`) after
the content changed; ctime cannot be set by a user, so such a file is hashed again.

Re-tracking an unchanged tree then costs one `stat` per file instead of a read. The cache is
only an optimisation: any failure to read or write it is logged and ignored.

It also remembers, for a scanned tree's fingerprint (every file's path, size, mtime and ctime),
the id of the entries made from it: re-tracking an unchanged tree into a field that already
holds exactly those entries then needs no entries built at all.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

from artifactfs.cache.location import default_cache_dir

log = logging.getLogger(__name__)

FileKey = tuple[str, int, int, int]  # absolute path, size, mtime_ns, ctime_ns
REMEMBERED_SCANS = 10_000


class HashCache:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_cache_dir() / "local-hashes.sqlite"
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Private to the user; SQLite gives its -wal and -shm files the same mode.
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            os.chmod(self.path, 0o600)
            conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS hashes_v2 (path TEXT PRIMARY KEY,"
                " size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,"
                " sha1 TEXT NOT NULL)"
            )
            conn.execute(
                "CREATE TABLE IF NOT EXISTS scans_v1 (fingerprint TEXT PRIMARY KEY,"
                " entries_id TEXT NOT NULL)"
            )
            conn.commit()
            self._conn = conn
        except (OSError, sqlite3.Error) as exc:
            log.warning("local hash cache %s unusable, hashing everything: %s", self.path, exc)

    def lookup_under(self, directory: str) -> dict[str, tuple[int, int, int, str]]:
        """Every remembered file below `directory`: path -> (size, mtime_ns, ctime_ns, sha1)."""
        if self._conn is None:
            return {}
        prefix = directory.rstrip("/") + "/"
        # A range scan on the primary key: every path that starts with the prefix.
        upper = prefix[:-1] + chr(ord("/") + 1)
        try:
            with self._lock:
                rows = self._conn.execute(
                    "SELECT path, size, mtime_ns, ctime_ns, sha1 FROM hashes_v2"
                    " WHERE path >= ? AND path < ?",
                    (prefix, upper),
                ).fetchall()
        except sqlite3.Error as exc:
            log.warning("local hash cache lookup failed: %s", exc)
            return {}
        return {path: (size, mtime, ctime, sha1) for path, size, mtime, ctime, sha1 in rows}

    def lookup(self, key: FileKey) -> str | None:
        if self._conn is None:
            return None
        try:
            with self._lock:
                row = self._conn.execute(
                    "SELECT sha1 FROM hashes_v2"
                    " WHERE path = ? AND size = ? AND mtime_ns = ? AND ctime_ns = ?",
                    key,
                ).fetchone()
        except sqlite3.Error as exc:
            log.warning("local hash cache lookup failed: %s", exc)
            return None
        return row[0] if row else None

    def remember(self, items: Iterable[tuple[FileKey, str]]) -> None:
        if self._conn is None:
            return
        rows = [(path, size, mtime, ctime, sha1) for (path, size, mtime, ctime), sha1 in items]
        if not rows:
            return
        try:
            with self._lock, self._conn:
                self._conn.executemany(
                    "INSERT OR REPLACE INTO hashes_v2 VALUES (?, ?, ?, ?, ?)", rows
                )
        except sqlite3.Error as exc:
            log.warning("local hash cache update failed: %s", exc)

    def entries_id(self, fingerprint: str) -> str | None:
        """The id of the entries last made from a scan with this fingerprint, if remembered."""
        if self._conn is None:
            return None
        try:
            with self._lock:
                row = self._conn.execute(
                    "SELECT entries_id FROM scans_v1 WHERE fingerprint = ?", (fingerprint,)
                ).fetchone()
        except sqlite3.Error as exc:
            log.warning("local hash cache lookup failed: %s", exc)
            return None
        return row[0] if row else None

    def remember_entries_id(self, fingerprint: str, entries_id: str) -> None:
        if self._conn is None:
            return
        try:
            with self._lock, self._conn:
                self._conn.execute(
                    "INSERT OR REPLACE INTO scans_v1 VALUES (?, ?)", (fingerprint, entries_id)
                )
                # Only the latest scans matter: keep the table small.
                self._conn.execute(
                    "DELETE FROM scans_v1 WHERE rowid <= (SELECT max(rowid) FROM scans_v1) - ?",
                    (REMEMBERED_SCANS,),
                )
        except sqlite3.Error as exc:
            log.warning("local hash cache update failed: %s", exc)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
