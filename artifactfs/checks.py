"""`verify` and `diff`: comparing tracked entries with their sources, or with each other."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from artifactfs.entries import ArtifactFileData
from artifactfs.errors import ArtifactfsError, SourceChangedError, UnreadableSourceError
from artifactfs.progress import progress_bar
from artifactfs.sources import source_for_entry
from artifactfs.worker_pool import map_interruptibly

VERIFY_WORKERS = 8


@dataclass(frozen=True)
class VerifyProblem:
    reason: str
    # True: the source no longer holds the tracked bytes. False: it could not be checked
    # (a server out of reach or too slow, no credentials, access denied, a bucket not found
    # at the endpoint): it may still.
    changed: bool


def _problem(entry: ArtifactFileData, stop: threading.Event) -> VerifyProblem | None:
    try:
        source_for_entry(entry).check(entry, stop)
    except UnreadableSourceError as exc:  # before its base class: refused, not changed
        return VerifyProblem(str(exc), changed=False)
    except SourceChangedError as exc:
        return VerifyProblem(str(exc), changed=True)
    except ArtifactfsError as exc:
        return VerifyProblem(str(exc), changed=False)
    return None


def verify_entries(
    entries: Sequence[ArtifactFileData], show_progress: bool | None = None
) -> dict[str, VerifyProblem]:
    """file_path -> why its source does not hold, or may not hold, the tracked bytes; empty
    when all do."""
    problems: dict[str, VerifyProblem] = {}
    with progress_bar(len(entries), "verifying", enabled=show_progress) as bar:

        def record(entry: ArtifactFileData, problem: VerifyProblem | None) -> None:
            bar.update(1)
            if problem is not None:
                problems[entry.file_path] = problem

        # A Ctrl-C gives up the local files being hashed; a remote check is one request.
        map_interruptibly(_problem, entries, VERIFY_WORKERS, record)
    return problems


@dataclass
class ArtifactDiff:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


def diff_entries(old: Sequence[ArtifactFileData], new: Sequence[ArtifactFileData]) -> ArtifactDiff:
    """Paths only in `new`, only in `old`, and in both with other hash, size or type."""
    old_by_path = {e.file_path: e for e in old}
    new_by_path = {e.file_path: e for e in new}
    diff = ArtifactDiff()
    for path in sorted(old_by_path.keys() | new_by_path.keys()):
        before, after = old_by_path.get(path), new_by_path.get(path)
        if before is None:
            diff.added.append(path)
        elif after is None:
            diff.removed.append(path)
        elif (before.file_hash, before.size, before.type) != (
            after.file_hash,
            after.size,
            after.type,
        ):
            diff.changed.append(path)
    return diff
