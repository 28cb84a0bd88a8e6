"""Turning a location into artifact entries, and merging them into a field's artifact.

Everything that can fail (listing, hashing, path checks, conflicts) happens before anything is
written, so a refused `track_files` leaves the store exactly as it was.
"""

from __future__ import annotations

from artifactfs.entries import (
    ArtifactFileData,
    artifact_id,
    find_file_dir_conflict,
    join_destination,
    validate_path,
)
from artifactfs.errors import ArtifactfsError
from artifactfs.progress import progress_bar
from artifactfs.sources import source_for_location
from artifactfs.store import ArtifactRecord, RunRecord, Store


def collect_entries(
    location: str, destination: str | None = None, show_progress: bool | None = None
) -> dict[str, ArtifactFileData]:
    """Entries for every file at `location`, keyed by their path in the artifact."""
    if destination is not None:
        validate_path(destination.rstrip("/"))  # refuse before hashing a large tree
    source = source_for_location(location)
    entries: dict[str, ArtifactFileData] = {}
    with progress_bar(None, f"tracking {location}", enabled=show_progress) as bar:

        def on_progress(done: int) -> None:
            bar.update(done - bar.n)

        for entry in source.list_location(location, on_progress):
            path = join_destination(destination, entry.file_path)
            entries[path] = entry.with_path(path)
    if not entries:
        raise ArtifactfsError(f"nothing to track at {location}: no files there")
    return entries


def merged_entries(
    old_entries: list[ArtifactFileData], new_entries: dict[str, ArtifactFileData]
) -> list[ArtifactFileData]:
    """The old entries plus the new ones (a new one replaces an old one of the same path)."""
    merged = {entry.file_path: entry for entry in old_entries}
    merged.update(new_entries)
    conflict = find_file_dir_conflict(merged)
    if conflict is not None:
        file_path, below = conflict
        raise ArtifactfsError(
            f"{file_path!r} would be both a file and a directory (because of {below!r})"
        )
    return sorted(merged.values(), key=lambda e: e.file_path)


def record_entries(
    store: Store, run: RunRecord, field_path: str, new_entries: dict[str, ArtifactFileData]
) -> ArtifactRecord:
    """Merge `new_entries` into the run's field; returns the field's new artifact."""
    return store.update_field(
        run,
        field_path,
        lambda old: merged_entries(old, new_entries),
        # The field already holding exactly these entries makes the merge a no-op.
        unchanged_if=artifact_id(new_entries.values()),
    )
