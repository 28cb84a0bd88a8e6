"""The `artifactfs` command line (click).

Every failure is one line on stderr with no traceback: exit 2 for bad usage or input, 1 for a
failed check (`verify`, a download whose bytes no longer match).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import wcwidth

from artifactfs import __version__
from artifactfs.api import project_from_environment, run_in_project
from artifactfs.cache import CacheBusyError, ChunkCache, cache_usage
from artifactfs.cache.location import DEFAULT_CACHE_SIZE, chunk_directory, parse_size
from artifactfs.checks import diff_entries, verify_entries
from artifactfs.download import download_entries
from artifactfs.errors import ArtifactfsError, CheckFailedError, NotFoundError
from artifactfs.fs import daemon
from artifactfs.fs.daemon import MountOptions
from artifactfs.naming import parse_project, validate_field_path
from artifactfs.neptune_import import Rebase, import_export
from artifactfs.reader import DEFAULT_DEADLINE
from artifactfs.store import RunRecord, Store
from artifactfs.tracking import PendingTrack

CACHE_DIR_HELP = "Cache directory [default: $XDG_CACHE_HOME/artifactfs]"
# Raised for a group run without a command (click 8.2 on; 8.1 printed the help and exited).
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", None)


class Context:
    def __init__(
        self, store_uri: str | None, project: str | None, project_given: str | None = None
    ) -> None:
        self.store_uri = store_uri
        self.project = project  # from --project, else the environment
        self.project_given = project_given  # from --project only
        # Only commands that record may make a new store: the others, given a path where
        # there is none (a typo), say so rather than leave an empty store behind.
        self.may_create_store = False
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.store_uri, create=self.may_create_store)
        return self._store

    def run(self, run_id: str) -> RunRecord:
        return self.store.get_run(run_id)


pass_context = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--store",
    "store_uri",
    envvar="ARTIFACTFS_STORE",
    metavar="URI",
    help="Store: a file path, sqlite:////abs/path.db or postgresql://... "
    "[default: $XDG_DATA_HOME/artifactfs/store.db]",
)
@click.option("--project", metavar="P", help="Project 'workspace/name' [env: ARTIFACTFS_PROJECT]")
@click.version_option(__version__, prog_name="artifactfs")
@click.pass_context
def cli(ctx: click.Context, store_uri: str | None, project: str | None) -> None:
    """Track which data each run used, and read it back: files, hashes, downloads, mounts."""
    ctx.obj = Context(store_uri, project_from_environment(project), project)


@cli.command()
@pass_context
def runs(ctx: Context) -> None:
    """List runs: id, project, created, fields."""
    project = parse_project(ctx.project) if ctx.project is not None else None
    try:
        records = ctx.store.list_runs(project)
    except NotFoundError:
        if ctx.store_uri is not None:
            raise  # a store named by --store or ARTIFACTFS_STORE: a typo is said
        records = []  # the default store, before anything was tracked here: no runs yet
    rows = [("ID", "PROJECT", "CREATED (UTC)", "FIELDS")]
    rows += [(r.run_id, str(r.project), r.created_at, ",".join(r.fields) or "-") for r in records]
    _print_table(rows)


@cli.command()
@click.option("--run", "run_id", metavar="ID", help="Add to this run instead of a new one.")
@click.option("--destination", metavar="D", help="Prefix every file path with D.")
@click.argument("field_path", metavar="FIELD")
@click.argument("location", metavar="PATH")
@pass_context
def track(
    ctx: Context, run_id: str | None, destination: str | None, field_path: str, location: str
) -> None:
    """Track the files at PATH (path, file://, s3://, gs://) in FIELD; prints the run id."""
    ctx.may_create_store = run_id is None  # a new run; an existing one needs its store
    field_path = _field_argument(field_path)
    if run_id is None and ctx.project is None:
        raise ArtifactfsError("no project: pass --project or set ARTIFACTFS_PROJECT (or --run)")
    pending = PendingTrack(location, destination)
    if run_id is not None:
        record = run_in_project(ctx.store, run_id, ctx.project_given)
        pending.record(ctx.store, record, field_path)
    else:
        assert ctx.project is not None
        # The run and its field in one transaction: a refused location, or a process killed
        # while it hashes or writes, leaves no new, empty run behind.
        record, _ = pending.record_in_new_run(ctx.store, parse_project(ctx.project), field_path)
    click.echo(f"tracked {pending.file_count} file(s) in {record.run_id}/{field_path}")
    click.echo(record.run_id)


@cli.command("hash")
@click.argument("run_id", metavar="RUN")
@click.argument("field_path", metavar="FIELD")
@pass_context
def hash_command(ctx: Context, run_id: str, field_path: str) -> None:
    """Print the artifact hash of RUN's FIELD."""
    field_path = _field_argument(field_path)
    click.echo(ctx.store.field_artifact(ctx.run(run_id), field_path).hash)


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.argument("field_path", metavar="FIELD")
@click.option("--json", "as_json", is_flag=True, help="Print entries as a JSON array.")
@pass_context
def files(ctx: Context, run_id: str, field_path: str, as_json: bool) -> None:
    """List the file entries of RUN's FIELD."""
    entries = _entries(ctx, run_id, field_path)
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in entries], indent=2, ensure_ascii=False))
        return
    rows = [("PATH", "SIZE", "TYPE", "HASH", "SOURCE")]
    rows += [
        (
            shown(e.file_path),
            "-" if e.size is None else str(e.size),
            e.type,
            e.file_hash,
            shown(e.source_url),
        )
        for e in entries
    ]
    _print_table(rows)


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.argument("field_path", metavar="FIELD")
@click.argument("destination", metavar="DEST", type=click.Path(file_okay=False))
@click.option("--symlink-local", is_flag=True, help="Symlink local sources instead of copying.")
@pass_context
def download(
    ctx: Context, run_id: str, field_path: str, destination: str, symlink_local: bool
) -> None:
    """Write RUN's FIELD files under DEST, each checked against its tracked hash."""
    if not destination.strip():  # an unset shell variable: not "here"
        raise ArtifactfsError("DEST is empty: name the directory to write into ('.' for this one)")
    entries = _entries(ctx, run_id, field_path)
    report = download_entries(entries, destination, symlink_local=symlink_local)
    click.echo(
        f"{len(report.written)} file(s) written, {len(report.unchanged)} already up to date, "
        f"in {shown(destination)}"
    )


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.argument("field_path", metavar="[FIELD]", required=False)
@pass_context
def verify(ctx: Context, run_id: str, field_path: str | None) -> None:
    """Check that the sources still hold the tracked bytes; exit 1 if not."""
    record = ctx.run(run_id)
    field_paths = [_field_argument(field_path)] if field_path is not None else list(record.fields)
    if not field_paths:
        click.echo(f"OK: {run_id} has no tracked files: nothing to check")
        return
    changed = unchecked = checked = 0
    for path in field_paths:
        entries = _record_entries(ctx, record, path)
        checked += len(entries)
        for file_path, problem in sorted(verify_entries(entries).items()):
            if problem.changed:
                changed, label = changed + 1, "CHANGED"
            else:
                unchecked, label = unchecked + 1, "UNCHECKED"
            click.echo(f"{label} {shown(f'{path}/{file_path}')}: {one_line(problem.reason)}")
    found = []
    if changed:
        found.append(f"{changed} of {checked} file(s) in {run_id} no longer match what was tracked")
    if unchecked:
        found.append(f"{unchecked} of {checked} file(s) in {run_id} could not be checked")
    if found:
        raise CheckFailedError("; ".join(found))
    click.echo(f"OK: {checked} file(s) in {run_id} match what was tracked")


@cli.command()
@click.argument("run_a", metavar="RUN_A")
@click.argument("run_b", metavar="RUN_B")
@click.argument("field_path", metavar="FIELD")
@pass_context
def diff(ctx: Context, run_a: str, run_b: str, field_path: str) -> None:
    """Paths added (A), removed (D) and changed (M) from RUN_A's FIELD to RUN_B's."""
    changes = diff_entries(_entries(ctx, run_a, field_path), _entries(ctx, run_b, field_path))
    for marker, paths in (("A", changes.added), ("D", changes.removed), ("M", changes.changed)):
        for path in paths:
            click.echo(f"{marker}\t{shown(path)}")
    click.echo(
        f"{len(changes.added)} added, {len(changes.removed)} removed, "
        f"{len(changes.changed)} changed",
        err=True,
    )


@cli.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--run", "run_id", metavar="RUN", help="Make this run the root.")
@click.option(
    "--field", "field_path", metavar="FIELD", help="With --run: this artifact is the root."
)
@click.option(
    "--cache-dir", metavar="D", help="Cache directory [default: $XDG_CACHE_HOME/artifactfs]"
)
@click.option("--cache-size", default=DEFAULT_CACHE_SIZE, show_default=True, help="Byte limit.")
@click.option("--chunk-size", default="8M", show_default=True, help="Remote fetch unit.")
@click.option(
    "--read-deadline",
    default=f"{DEFAULT_DEADLINE:g}",
    show_default=True,
    metavar="SECONDS",
    help="A remote read still failing or unanswered after this long (retries included) "
    "fails with EIO.",
)
@click.option("--foreground", is_flag=True, help="Stay in the foreground and log to stderr too.")
@click.option("-o", "mount_options", multiple=True, metavar="OPT", help="Only: allow_other.")
@click.option("--log-file", metavar="F", help="Daemon log [default: in the cache directory].")
@pass_context
def mount(
    ctx: Context,
    mountpoint: str,
    run_id: str | None,
    field_path: str | None,
    cache_dir: str | None,
    cache_size: str,
    chunk_size: str,
    read_deadline: str,
    foreground: bool,
    mount_options: tuple[str, ...],
    log_file: str | None,
) -> None:
    """Mount every run's artifacts read-only at MOUNTPOINT; returns once it is ready."""
    extra = {opt for value in mount_options for opt in value.split(",") if opt}
    unknown = extra - {"allow_other"}
    if unknown:
        raise ArtifactfsError(f"unsupported mount option(s): {', '.join(sorted(unknown))}")
    if field_path is not None and run_id is None:
        raise ArtifactfsError("--field needs --run")
    if field_path is not None:
        field_path = _field_argument(field_path)
    options = MountOptions(
        mountpoint=mountpoint,
        store_uri=ctx.store_uri,
        run_id=run_id,
        field_path=field_path,
        cache_dir=cache_dir,
        cache_size=parse_size(cache_size),
        chunk_size=daemon.parse_chunk_size(chunk_size),
        read_deadline=daemon.parse_read_deadline(read_deadline),
        allow_other="allow_other" in extra,
        log_file=log_file,
    )
    started = daemon.mount(options, foreground=foreground)
    if started is not None:
        click.echo(
            f"mounted at {shown(started.mountpoint)} (daemon pid {started.pid}, "
            f"log: {shown(str(started.log_file))})"
        )


@cli.command()
@click.argument("mountpoint", type=click.Path())
def unmount(mountpoint: str) -> None:
    """Unmount MOUNTPOINT, also when its daemon has died."""
    daemon.unmount(mountpoint)
    click.echo(f"unmounted {shown(os.path.abspath(mountpoint))}")


@cli.command("import-neptune")
@click.argument("export_dir", metavar="EXPORT_FILES_DIR", type=click.Path(file_okay=False))
@click.option(
    "--rebase",
    "rebases",
    multiple=True,
    metavar="OLD=NEW",
    help="Rewrite source URLs starting with OLD (a path or URL prefix) to start with NEW.",
)
@click.option("--dry-run", is_flag=True, help="Check and report; write nothing.")
@pass_context
def import_neptune(ctx: Context, export_dir: str, rebases: tuple[str, ...], dry_run: bool) -> None:
    """Bring back runs exported from Neptune, keeping their ids; exit 1 if anything failed
    or was skipped."""
    parsed = [Rebase.parse(text) for text in rebases]
    ctx.may_create_store = not dry_run
    with contextlib.ExitStack() as cleanup:
        try:
            store = ctx.store
        except NotFoundError:  # a dry run into a store not made yet: as into an empty one
            scratch = cleanup.enter_context(tempfile.TemporaryDirectory())
            store = Store(os.path.join(scratch, "store.db"))
            cleanup.callback(store.close)
        report = import_export(store, Path(export_dir), parsed, dry_run=dry_run)
    verb = "would import" if dry_run else "imported"
    for label in report.imported:
        click.echo(f"{verb} {shown(label)}")
    for label in report.unchanged:
        click.echo(f"unchanged {shown(label)} (already imported)")
    for label, why in report.skipped.items():
        click.echo(f"skipped {shown(label)}: {one_line(why)}", err=True)
    for path, why in report.failed.items():
        click.echo(f"failed {shown(path)}: {one_line(why)}", err=True)
    summary = (
        f"{len(report.imported)} field(s) {verb}, {len(report.unchanged)} unchanged, "
        f"{len(report.skipped)} skipped, {len(report.failed)} failed"
    )
    if not report.ok:
        raise CheckFailedError(summary)
    if not report.imported:
        summary += ": nothing to do, the store already has this export"
    click.echo(summary)


def _chunk_directory(group_dir: str | None, command_dir: str | None) -> Path:
    """`cache --cache-dir D stats` and `cache stats --cache-dir D` both work."""
    chosen = command_dir or group_dir
    return chunk_directory(Path(chosen) if chosen else None)


def _open_cache(group_dir: str | None, command_dir: str | None) -> ChunkCache | None:
    """The cache, for a change to it: taken from any other process (a mount's cache is
    refused while it runs), and opened with no limit, so that opening it evicts nothing.
    None when there is no cache there (`_found_cache`)."""
    directory = _found_cache(group_dir, command_dir)
    if directory is None:
        return None
    try:
        return ChunkCache(directory, sys.maxsize, free_floor_bytes=0)
    except CacheBusyError as exc:
        advice = "unmount it (or end that download) first"
        raise CacheBusyError(exc.directory, exc.holder, advice) from None


def _found_cache(group_dir: str | None, command_dir: str | None) -> Path | None:
    """The cache directory the options name; None, said on stdout, when there is no cache
    there. A directory that is not one is refused: opening it would make it one (a mistyped
    --cache-dir must not fill a user's directory), and its files are not the cache's."""
    directory = _chunk_directory(group_dir, command_dir)
    names: set[str] | None
    try:
        names = {path.name for path in directory.iterdir()}
    except FileNotFoundError:
        names = set()
    except OSError:
        names = None  # not a directory, not readable: opening it says so, in the cache's words
    if names == set():
        click.echo(f"no cache in {shown(str(directory))}")
        return None
    # (A cache whose first start died before it wrote FORMAT has only LOCK, chunks and tmp.)
    foreign = names is not None and not names <= {"LOCK", "chunks", "tmp"}
    if foreign and not (directory / "FORMAT").is_file():
        raise ArtifactfsError(
            f"{directory} is not an artifactfs cache (it has no FORMAT file): left as it is"
        )
    return directory


cache_dir_option = click.option("--cache-dir", "command_dir", metavar="D", help=CACHE_DIR_HELP)


@cli.group()
@click.option("--cache-dir", metavar="D", help=CACHE_DIR_HELP)
@click.pass_context
def cache(ctx: click.Context, cache_dir: str | None) -> None:
    """Inspect or clean the chunk cache."""
    ctx.obj = cache_dir


@cache.command("stats")
@cache_dir_option
@click.pass_obj
def cache_stats(group_dir: str | None, command_dir: str | None) -> None:
    """Bytes and chunks now in the cache (also while a mount uses it; changes nothing)."""
    directory = _found_cache(group_dir, command_dir)
    if directory is None:
        return
    chunks, total = cache_usage(directory)
    click.echo(f"directory: {directory}")
    click.echo(f"chunks: {chunks}")
    click.echo(f"bytes: {total}")


@cache.command("clear")
@cache_dir_option
@click.pass_obj
def cache_clear(group_dir: str | None, command_dir: str | None) -> None:
    """Remove every cached chunk (not while a mount or download uses the cache)."""
    chunks = _open_cache(group_dir, command_dir)
    if chunks is None:
        return
    try:
        freed = chunks.clear()
    finally:
        chunks.close()
    click.echo(f"cleared {shown(str(chunks.directory))}: {freed} bytes freed")


@cache.command("fsck")
@cache_dir_option
@click.pass_obj
def cache_fsck(group_dir: str | None, command_dir: str | None) -> None:
    """Re-check every cached chunk and drop the damaged ones (not while a mount uses it).
    Exit 1 if any was dropped (each is fetched again when read), as fsck(8) tools do."""
    chunks = _open_cache(group_dir, command_dir)
    if chunks is None:
        return
    try:
        checked, dropped = chunks.fsck()
    finally:
        chunks.close()
    click.echo(f"checked {checked} chunk(s), dropped {dropped} damaged")
    if dropped:
        raise click.exceptions.Exit(1)


def _entries(ctx: Context, run_id: str, field_path: str) -> list[Any]:
    return _record_entries(ctx, ctx.run(run_id), _field_argument(field_path))


def _record_entries(ctx: Context, record: RunRecord, field_path: str) -> list[Any]:
    """The entries of a field (already a valid path) of a run already read."""
    return ctx.store.entries(ctx.store.field_artifact(record, field_path).id)


def _field_argument(text: str) -> str:
    """A FIELD argument; a slash after it (a shell's completion adds one) does not count, as
    in the API's `run["x/"]`."""
    return validate_field_path(text.rstrip("/") or text)


# Escaped by `shown`, as C and git write them; other control characters in octal.
_ESCAPES = {"\a": "a", "\b": "b", "\t": "t", "\n": "n", "\v": "v", "\f": "f", "\r": "r"}
_PATH_ESCAPES = _ESCAPES | {'"': '"', "\\": "\\"}  # in a quoted path, its quotes too


def shown(path: str) -> str:
    """`path` as one line of output, quoted as git quotes paths: when it holds a control
    character (a newline would split it in two), a double quote or a backslash, it is printed
    in double quotes with C escapes (`"a\\nb"`); any other path as it is."""
    if path.isprintable() and '"' not in path and "\\" not in path:
        return path  # nearly every path: no character to look at one by one
    escaped = "".join(_escaped(char, _PATH_ESCAPES) for char in path)
    return path if escaped == path else f'"{escaped}"'


def one_line(text: str) -> str:
    """A message (which may name paths) with its control characters escaped, unquoted."""
    if text.isprintable():  # no control character, no line or paragraph separator
        return text
    return "".join(_escaped(char, _ESCAPES) for char in text)


def _escaped(char: str, escapes: dict[str, str]) -> str:
    if char in escapes:
        return f"\\{escapes[char]}"
    # Control characters (C0, DEL, C1: U+0085 ends a line, U+009B starts a terminal escape)
    # and the line and paragraph separators: their UTF-8 bytes in octal, as git writes them.
    if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
        return "".join(f"\\{byte:03o}" for byte in char.encode("utf-8"))
    return char


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    """Columns aligned as a terminal shows them: a CJK character takes two columns, a
    combining mark none (cells are `shown`: no control characters)."""
    widths = [max(_columns(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell + " " * (width - _columns(cell))
            for cell, width in zip(row[:-1], widths, strict=False)
        ]
        click.echo("  ".join([*cells, row[-1]]).rstrip())


def _columns(text: str) -> int:
    width = wcwidth.wcswidth(text)
    return width if width >= 0 else len(text)  # -1: a control character (`shown` escapes them)


def _fail(message: str, code: int) -> int:
    click.echo(f"artifactfs: error: {' '.join(message.split())}", err=True)
    return code


class _WarningLine(logging.Formatter):
    """A warning of artifactfs's own (a version that cannot be pinned, a download through a
    temporary cache, a damaged chunk dropped) as one line. Records logged as errors too: the
    command carries on past them (a chunk is fetched again), and its own failure is the one
    `artifactfs: error:` line."""

    def format(self, record: logging.LogRecord) -> str:
        return f"artifactfs: warning: {' '.join(record.getMessage().split())}"


def _show_own_warnings() -> None:
    """artifactfs's warnings on stderr, one line each; not the libraries' (botocore, google
    auth, urllib3), whose notices are not the user's business. Errors reach the user as one
    line from main(). Set on the root logger, so that a daemon replacing its logging
    (`mount`) drops this handler rather than writing each line twice."""
    handler = logging.StreamHandler()
    handler.addFilter(lambda record: record.name.partition(".")[0] == "artifactfs")
    handler.setFormatter(_WarningLine())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


def main(argv: Sequence[str] | None = None) -> int:
    _show_own_warnings()
    try:
        # Not standalone, click returns the status of an `Exit` (`--help`, `cache fsck` that
        # dropped chunks) rather than raising it; our commands return nothing else.
        status = cli.main(args=argv, prog_name="artifactfs", standalone_mode=False)
    except click.Abort:
        return _fail("aborted", 130)
    except click.ClickException as exc:
        if _NO_ARGS_IS_HELP is not None and isinstance(exc, _NO_ARGS_IS_HELP):
            click.echo(exc.format_message(), err=True)  # the help, as it is: not one line
            return 2
        return _fail(exc.format_message(), 2)
    except ArtifactfsError as exc:
        return _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:
        return 141
    return status if isinstance(status, int) else 0


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
