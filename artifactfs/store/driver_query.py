"""SELECTs compiled once per dialect and run on the database driver's own cursor.

The mount asks the store for one name in one directory at every lookup of a path not listed
before (a `stat` in a large artifact), and for a directory's entries at its first listing.
Through SQLAlchemy's statement execution (parameter processing, events, result wrapping) each
of those cost several times the database's own work: ad hoc, on a 1,000,000-entry artifact in
SQLite, a lookup's two indexed queries took 220-385 us that way and 37-78 us on the driver's
cursor of a pooled connection. Writes and everything else keep SQLAlchemy's execution.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Dialect, Select


class DriverQuery:
    """A SELECT with named bind parameters, run on a DBAPI cursor (`run`): compiled once for
    each dialect it meets, its parameters passed as that driver takes them (SQLite's in the
    compiled order, psycopg's by name)."""

    def __init__(self, statement: Select[Any]) -> None:
        self._statement = statement
        self._compiled: dict[str, tuple[str, tuple[str, ...] | None]] = {}

    def run(self, cursor: Any, dialect: Dialect, params: dict[str, Any]) -> Any:
        """Execute on `cursor` (a connection of `dialect`); the cursor, to fetch from."""
        sql, order = self._compiled_for(dialect)
        cursor.execute(sql, params if order is None else tuple(params[name] for name in order))
        return cursor

    def _compiled_for(self, dialect: Dialect) -> tuple[str, tuple[str, ...] | None]:
        found = self._compiled.get(dialect.name)
        if found is None:
            compiled = self._statement.compile(dialect=dialect)
            order = tuple(compiled.positiontup or ()) if compiled.positional else None
            found = self._compiled[dialect.name] = (str(compiled), order)
        return found
