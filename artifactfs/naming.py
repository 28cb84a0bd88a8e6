"""Names users type: projects (`workspace/name`), keys (`CLS`), run ids (`CLS-4`), fields."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from artifactfs.entries import path_problem
from artifactfs.errors import ArtifactfsError

DEFAULT_WORKSPACE = "default"
RESERVED_NAMESPACE = "sys"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_KEY_RE = re.compile(r"^[A-Z][A-Z0-9]{0,15}$")
_RUN_ID_RE = re.compile(r"^([A-Z][A-Z0-9]{0,15})-([1-9][0-9]{0,9})$")
_VOWELS = set("AEIOU")

# The store's column limits (PostgreSQL enforces them; SQLite would not): checked here so that
# both backends accept and refuse the same names, with the same message.
MAX_RUN_NUMBER = 2**31 - 1  # runs.number and projects.last_number are 32-bit INTEGER
MAX_FIELD_PATH_CHARS = 1024  # fields.path is VARCHAR(1024): characters, not bytes
MAX_CUSTOM_RUN_ID_CHARS = 36  # Neptune's limit; custom_run_ids.custom_id is VARCHAR(36)


@dataclass(frozen=True)
class ProjectName:
    workspace: str
    name: str

    def __str__(self) -> str:
        return f"{self.workspace}/{self.name}"


def parse_project(text: str) -> ProjectName:
    """`workspace/name` or `name` (then in the default workspace)."""
    parts = text.strip().split("/")
    if len(parts) == 1:
        parts = [DEFAULT_WORKSPACE, parts[0]]
    if len(parts) != 2 or not all(_NAME_RE.match(part) for part in parts):
        raise ArtifactfsError(
            f"invalid project {text!r}: expected 'workspace/name' or 'name' "
            "(letters, digits, '.', '_', '-')"
        )
    return ProjectName(parts[0], parts[1])


def validate_project_key(key: str) -> str:
    if not _KEY_RE.match(key):
        raise ArtifactfsError(
            f"invalid project key {key!r}: expected upper-case letters and digits, like 'CLS'"
        )
    return key


def derive_project_key(name: str) -> str:
    """`classification` -> `CLS`: the first letter, then the next distinct consonants."""
    letters = [c for c in name.upper() if "A" <= c <= "Z"]
    if not letters:
        return "PRJ"
    key = letters[0]
    for char in letters[1:]:
        if len(key) == 3:
            break
        if char not in _VOWELS and char != key[-1]:
            key += char
    for char in letters[1:]:  # short, vowel-heavy names: pad with what is left
        if len(key) == 3:
            break
        key += char
    return key


def parse_run_id(text: str) -> tuple[str, int]:
    match = _RUN_ID_RE.match(text.strip())
    if not match:
        raise ArtifactfsError(f"invalid run id {text!r}: expected KEY-N, like 'CLS-4'")
    number = int(match.group(2))
    if number > MAX_RUN_NUMBER:
        raise ArtifactfsError(
            f"invalid run id {text.strip()!r}: run numbers go up to {MAX_RUN_NUMBER}"
        )
    return match.group(1), number


def refuse_field_namespace_conflict(field_path: str, others: Iterable[str], run_id: str) -> None:
    """Refuse `field_path` if it would be a namespace of another field of the run (`a` and
    `a/b`), or one of them a namespace of it."""
    for other in others:
        if other.startswith(field_path + "/") or field_path.startswith(other + "/"):
            raise ArtifactfsError(
                f"field {field_path!r} conflicts with field {other!r} of run {run_id}: "
                "a field cannot be a namespace of another"
            )


def validate_field_path(path: str) -> str:
    """A field path like `data_versions` or `datasets/train`, outside the reserved `sys/`."""
    problem = path_problem(path)
    if problem is not None:
        raise ArtifactfsError(f"invalid field {path!r}: {problem}")
    if len(path) > MAX_FIELD_PATH_CHARS:  # only the start: the whole would fill the screen
        raise ArtifactfsError(
            f"invalid field {path[:40]!r}... ({len(path)} characters): a field path has at "
            f"most {MAX_FIELD_PATH_CHARS} characters"
        )
    if path.split("/")[0] == RESERVED_NAMESPACE:
        raise ArtifactfsError(f"invalid field {path!r}: the 'sys' namespace is reserved")
    return path


def validate_custom_run_id(custom_id: object) -> None:
    """Neptune's limits, and what both backends store alike (PostgreSQL refuses NUL and
    text that is not UTF-8; its VARCHAR(36) counts characters, as `len` does)."""
    if not isinstance(custom_id, str):
        raise ArtifactfsError(
            f"invalid custom run id: a string is needed, not {type(custom_id).__name__}"
        )
    if not custom_id:
        raise ArtifactfsError("invalid custom run id: it is empty")
    if len(custom_id) > MAX_CUSTOM_RUN_ID_CHARS:
        raise ArtifactfsError(
            f"invalid custom run id {custom_id[:MAX_CUSTOM_RUN_ID_CHARS]!r}...: it has "
            f"{len(custom_id)} characters, at most {MAX_CUSTOM_RUN_ID_CHARS} are allowed"
        )
    if "\0" in custom_id:
        raise ArtifactfsError(f"invalid custom run id {custom_id!r}: it contains a NUL character")
    try:
        custom_id.encode("utf-8")
    except UnicodeEncodeError:
        raise ArtifactfsError(
            f"invalid custom run id {custom_id!r}: it is not valid Unicode text"
        ) from None
