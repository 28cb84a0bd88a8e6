"""Bringing back runs exported from Neptune, with their original ids.

The export tool wrote `<dir>/<workspace>/<project>/<RUN-ID>/<field path>/files_list.json`.
Each is a JSON array of entries in Neptune's wire form (`filePath`, `fileHash`, `type`,
`size`, `metadata` as a list of `{"key", "value"}`). Entries are imported as they were
recorded; only source URLs may be rewritten (`--rebase`), since an export names paths on
another machine. Every path check of tracking applies. Each file is imported on its own: a
malformed one is reported and the rest goes on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from artifactfs.entries import (
    KNOWN_TYPES,
    ArtifactFileData,
    artifact_id,
    find_file_dir_conflict,
    path_problem,
)
from artifactfs.errors import ArtifactfsError, NotFoundError
from artifactfs.naming import (
    ProjectName,
    parse_project,
    parse_run_id,
    refuse_field_namespace_conflict,
    validate_field_path,
)
from artifactfs.store import Store

FILES_LIST = "files_list.json"
URL_KEYS = ("file_path", "location")


class MalformedExportError(ArtifactfsError):
    pass


@dataclass(frozen=True)
class Rebase:
    old: str
    new: str

    @classmethod
    def parse(cls, text: str) -> Rebase:
        old, sep, new = text.partition("=")
        if not sep or not old or not new:
            raise ArtifactfsError(f"invalid --rebase {text!r}: expected OLD_PREFIX=NEW_PREFIX")
        return cls(_as_url(old), _as_url(new))

    def apply(self, url: str) -> str:
        if url == self.old or url.startswith(self.old.rstrip("/") + "/"):
            return self.new.rstrip("/") + url[len(self.old.rstrip("/")) :]
        return url


def _as_url(prefix: str) -> str:
    """Plain paths become file:// URLs, so `/home/a=/mnt/b` and URLs both work."""
    if "://" in prefix:
        return prefix
    return "file://" + os.path.abspath(os.path.expanduser(prefix))


@dataclass(frozen=True)
class ExportedField:
    source: Path
    project: ProjectName
    run_id: str
    field_path: str
    entries: list[ArtifactFileData]


@dataclass
class ImportReport:
    imported: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # conflicts with what is stored
    failed: dict[str, str] = field(default_factory=dict)  # files that could not be read

    @property
    def ok(self) -> bool:
        return not self.skipped and not self.failed


def find_exports(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if FILES_LIST in filenames:
            yield Path(dirpath) / FILES_LIST


def parse_export(root: Path, path: Path, rebases: Sequence[Rebase]) -> ExportedField:
    """One files_list.json as a field of a run; MalformedExportError says what is wrong."""
    parts = path.relative_to(root).parts[:-1]
    if len(parts) < 4:
        raise MalformedExportError(
            "expected <workspace>/<project>/<RUN-ID>/<field>/files_list.json"
        )
    try:
        project = parse_project(f"{parts[0]}/{parts[1]}")
        run_id = parts[2]
        parse_run_id(run_id)
        field_path = validate_field_path("/".join(parts[3:]))
    except ArtifactfsError as exc:
        raise MalformedExportError(str(exc)) from None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MalformedExportError(f"not valid JSON: {exc}") from None
    if not isinstance(raw, list):
        raise MalformedExportError("expected a JSON array of entries")
    entries = [_parse_entry(item, index, rebases) for index, item in enumerate(raw)]
    if not entries:
        raise MalformedExportError("the artifact has no entries")
    paths = [e.file_path for e in entries]
    if len(set(paths)) != len(paths):
        raise MalformedExportError("the same filePath appears twice")
    conflict = find_file_dir_conflict(paths)
    if conflict is not None:
        raise MalformedExportError(f"{conflict[0]!r} is both a file and a directory")
    return ExportedField(path, project, run_id, field_path, entries)


def _parse_entry(item: Any, index: int, rebases: Sequence[Rebase]) -> ArtifactFileData:
    where = f"entry {index}"
    if not isinstance(item, dict):
        raise MalformedExportError(f"{where}: expected an object")
    file_path, file_hash, kind = item.get("filePath"), item.get("fileHash"), item.get("type")
    size, metadata_list = item.get("size"), item.get("metadata", [])
    if not isinstance(file_path, str):
        raise MalformedExportError(f"{where}: filePath must be a string")
    problem = path_problem(file_path)
    if problem is not None:
        raise MalformedExportError(f"{where}: invalid filePath {file_path!r}: {problem}")
    if not isinstance(file_hash, str) or not file_hash:
        raise MalformedExportError(f"{where} ({file_path}): fileHash must be a non-empty string")
    if kind not in KNOWN_TYPES:
        raise MalformedExportError(
            f"{where} ({file_path}): type must be one of {', '.join(KNOWN_TYPES)}, not {kind!r}"
        )
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise MalformedExportError(f"{where} ({file_path}): size must be a non-negative integer")
    if not isinstance(metadata_list, list):
        raise MalformedExportError(f"{where} ({file_path}): metadata must be a list")
    metadata: dict[str, str] = {}
    for pair in metadata_list:
        if not (
            isinstance(pair, dict)
            and isinstance(pair.get("key"), str)
            and isinstance(pair.get("value"), str)
        ):
            raise MalformedExportError(
                f"{where} ({file_path}): metadata items must be {{'key': str, 'value': str}}"
            )
        metadata[pair["key"]] = pair["value"]
    for key in URL_KEYS:
        if key in metadata:
            for rebase in rebases:
                metadata[key] = rebase.apply(metadata[key])
    if not (metadata.get("file_path") or metadata.get("location")):
        raise MalformedExportError(f"{where} ({file_path}): no file_path or location in metadata")
    return ArtifactFileData(file_path, file_hash, kind, size, metadata)


def import_export(
    store: Store, root: Path, rebases: Sequence[Rebase], dry_run: bool = False
) -> ImportReport:
    if not root.is_dir():
        raise NotFoundError(f"no such directory: {root}")
    report = ImportReport()
    found = False
    plan = _DryRunPlan() if dry_run else None
    for path in find_exports(root):
        found = True
        label = str(path.relative_to(root).parent)
        try:
            exported = parse_export(root, path, rebases)
        except MalformedExportError as exc:
            report.failed[str(path)] = str(exc)
            continue
        try:
            outcome = _import_field(store, exported, plan)
        except ArtifactfsError as exc:
            report.skipped[label] = str(exc)
            continue
        (report.imported if outcome == "imported" else report.unchanged).append(label)
    if not found:
        raise NotFoundError(f"no {FILES_LIST} files under {root}")
    return report


@dataclass
class _DryRunPlan:
    """What a dry run would have imported so far: it counts as stored, so that the dry run
    refuses what the import would refuse."""

    projects: dict[str, ProjectName] = field(default_factory=dict)  # run id -> its project
    fields: dict[str, dict[str, str]] = field(default_factory=dict)  # run id -> field -> id


def _import_field(store: Store, exported: ExportedField, plan: _DryRunPlan | None) -> str:
    """Import one field; with a dry run's plan, only say what the import would do."""
    fields = _stored_fields(store, exported)
    planned: dict[str, str] = {}
    if plan is not None:
        project = plan.projects.setdefault(exported.run_id, exported.project)
        if project != exported.project:
            raise ArtifactfsError(f"run {exported.run_id} exists in project {project}")
        planned = plan.fields.setdefault(exported.run_id, {})
        fields = {**fields, **planned}
    wanted = artifact_id(exported.entries)
    existing = fields.get(exported.field_path)
    if existing is not None:
        if existing == wanted:
            return "unchanged"
        raise ArtifactfsError(
            f"run {exported.run_id} already has field {exported.field_path!r} "
            "with other content: not overwritten"
        )
    if plan is not None:
        refuse_field_namespace_conflict(exported.field_path, fields, exported.run_id)
        planned[exported.field_path] = wanted
        return "imported"
    run, _created = store.ensure_run(exported.project, exported.run_id)
    store.update_field(run, exported.field_path, lambda _old: exported.entries)
    return "imported"


def _stored_fields(store: Store, exported: ExportedField) -> dict[str, str]:
    """The exported run's fields in the store (field path -> artifact id); none if it is new."""
    try:
        run = store.get_run(exported.run_id)
    except NotFoundError:
        return {}
    if run.project != exported.project:
        raise ArtifactfsError(f"run {exported.run_id} exists in project {run.project}")
    fields = store.run_fields(run.run_id) or {}
    return {path: field.artifact_id for path, field in fields.items()}
