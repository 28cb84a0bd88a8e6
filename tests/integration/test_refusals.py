"""Every refusal SPEC lists, through the real CLI: exit 2, one line on stderr, store unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import artifactfs
from artifactfs.store import Store
from tests.conftest import make_tree
from tests.support.stores import store_counts

# Every test here runs against SQLite and against PostgreSQL, but those marked
# backend_independent (SQLite only: the backend plays no part in what they check).
pytestmark = pytest.mark.store_backends


@pytest.fixture
def world(tmp_path: Path) -> dict[str, str]:
    """A store with some runs in it, and trees to (try to) track; names used by the cases."""
    data = make_tree(
        tmp_path / "data",
        {"a.csv": b"a\n", "b.csv": b"bb\n", "sub/c.csv": b"ccc\n", "日本.txt": b"n"},
    )
    make_tree(tmp_path / "xdir", {"x/y": b"below x"})  # gives the entry "x/y"
    make_tree(tmp_path / "files", {"x": b"x is a file", "y": b"y is a file", "b": b"b"})
    make_tree(tmp_path / "abc", {"a/b/c": b"deep"})

    base = artifactfs.init_run(project="p")  # P-1: "data" holds the data tree
    base["data"].track_files(str(data))
    files = artifactfs.init_run(project="p")  # P-2: "fd" holds the file "x", "a" a field
    files["fd"].track_files(str(tmp_path / "files" / "x"))
    files["a"].track_files(str(data / "a.csv"))
    dirs = artifactfs.init_run(project="p")  # P-3: "fd" holds "x/y" and "a/b/c"
    dirs["fd"].track_files(str(tmp_path / "xdir"))
    dirs["fd"].track_files(str(tmp_path / "abc"))
    dirs["n/m"].track_files(str(data / "b.csv"))
    other = artifactfs.init_run(project="ml-team/classification")  # CLS-1
    other["data_versions"].track_files(str(data))
    assert (base.id, files.id, dirs.id, other.id) == ("P-1", "P-2", "P-3", "CLS-1")
    return {
        "data": str(data),
        "tmp": str(tmp_path),
        "x_file": str(tmp_path / "files" / "x"),
        "y_file": str(tmp_path / "files" / "y"),
        "b_file": str(tmp_path / "files" / "b"),
        "xdir": str(tmp_path / "xdir"),
        "abc": str(tmp_path / "abc"),
    }


def assert_refused(cli, args: list[str], words: list[str]) -> str:
    """Run `artifactfs ARGS`; it must exit 2 with one clean line and change nothing."""
    counts_before = store_counts()
    runs_before = listed_runs()  # in this process: a CLI start costs ~0.6 s of CPU in CI

    result = cli(*args)

    assert result.returncode == 2, f"artifactfs {args}: {result}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"artifactfs {args}: stderr is not one line: {result.stderr!r}"
    for word in words:
        assert word.lower() in lines[0].lower(), f"{word!r} not in {lines[0]!r}"
    assert result.stdout.strip() == "", f"artifactfs {args}: printed {result.stdout!r}"

    assert store_counts() == counts_before
    assert listed_runs() == runs_before
    return lines[0]


def listed_runs() -> list[tuple[str, str, tuple[str, ...], str]]:
    """Every run as `artifactfs runs` shows it: id, project, fields and each field's hash."""
    store = Store()
    try:
        return [
            (
                run.run_id,
                str(run.project),
                run.fields,
                ",".join(store.field_artifact(run, f).hash for f in run.fields),
            )
            for run in store.list_runs()
        ]
    finally:
        store.close()


# Each case: (name, arguments with {placeholders} from `world`, words the error must contain).
# Refused for the arguments alone, before the store is used: the backend plays no part.
ARGUMENT_CASES = [
    ("missing path", ["track", "f", "{tmp}/no/such/dir"], ["no/such/dir"]),
    ("missing file url", ["track", "f", "file://{tmp}/no-such-file.csv"], ["no-such-file"]),
    ("empty location", ["track", "f", ""], ["empty"]),
    ("blank location", ["track", "f", "   "], ["empty"]),
    ("wildcard star", ["track", "f", "{data}/*.csv"], ["wildcard"]),
    ("wildcard question", ["track", "f", "{data}/?.csv"], ["wildcard"]),
    ("wildcard bracket", ["track", "f", "{data}/[ab].csv"], ["wildcard"]),
    ("wildcard relative", ["track", "f", "data/*.csv"], ["wildcard"]),
    # A bucket's name never holds them: refused before any request. In a key they may be
    # part of a name (tests in test_s3 and test_gcs).
    ("wildcard s3 bucket", ["track", "f", "s3://buck*et/data"], ["wildcard", "buck*et"]),
    ("wildcard gs bucket", ["track", "f", "gs://b?cket/data/x.csv"], ["wildcard", "b?cket"]),
    # Destinations that would escape the tree.
    ("destination ..", ["track", "f", "{data}", "--destination", "../up"], [".."]),
    ("destination .. inside", ["track", "f", "{data}", "--destination", "a/../../b"], [".."]),
    ("destination absolute", ["track", "f", "{data}", "--destination", "/abs"], ["abs"]),
    ("destination long", ["track", "f", "{data}", "--destination", "d" * 256], ["255"]),
    # Unknown schemes.
    ("ftp", ["track", "f", "ftp://h/x"], ["ftp"]),
    ("http", ["track", "f", "http://h/x"], ["http"]),
    ("hdfs", ["track", "f", "hdfs://namenode/data"], ["hdfs"]),
    # Invalid field names.
    ("field empty", ["track", "", "{data}"], ["field"]),
    ("field empty segment", ["track", "a//b", "{data}"], ["a//b"]),
    ("field sys/id", ["track", "sys/id", "{data}"], ["sys"]),
    ("field sys", ["track", "sys", "{data}"], ["sys"]),
    ("field ..", ["track", "../x", "{data}"], ["../x"]),
    ("field absolute", ["track", "/abs", "{data}"], ["/abs"]),
    # Run ids that cannot exist.
    ("run malformed lower", ["track", "--run", "p-1", "f", "{data}"], ["p-1"]),
    ("run malformed zero", ["track", "--run", "P-0", "f", "{data}"], ["P-0"]),
    ("run malformed no dash", ["track", "--run", "P1", "f", "{data}"], ["P1"]),
    ("run malformed text", ["track", "--run", "P-x", "f", "{data}"], ["P-x"]),
    ("run malformed empty", ["track", "--run", "", "f", "{data}"], ["run id"]),
]
# Refused for what the store holds: run on both backends.
STORE_CASES = [
    ("missing path in run", ["track", "--run", "P-1", "data", "{tmp}/nope"], ["nope"]),
    # A path that is both a file and a directory, in one field of one run.
    ("dir below a file", ["track", "--run", "P-2", "fd", "{xdir}"], ["'x'", "x/y"]),
    ("file above a dir", ["track", "--run", "P-3", "fd", "{x_file}"], ["'x'", "x/y"]),
    (
        "destination below a file",
        ["track", "--run", "P-2", "fd", "{y_file}", "--destination", "x"],
        ["'x'", "x/y"],
    ),
    (
        "destination onto a dir",
        ["track", "--run", "P-3", "fd", "{b_file}", "--destination", "a"],
        ["a/b"],
    ),
    # A field may not be a namespace of another field of the same run.
    ("field below a field", ["track", "--run", "P-2", "a/b", "{data}"], ["a/b"]),
    ("field above a field", ["track", "--run", "P-3", "n", "{data}"], ["n/m"]),
    # Runs that do not exist.
    ("run not found", ["track", "--run", "P-99", "f", "{data}"], ["P-99"]),
    ("run of unknown key", ["track", "--run", "NOPE-1", "f", "{data}"], ["NOPE-1"]),
    (
        "run of another project",
        ["--project", "ml-team/classification", "track", "--run", "P-1", "data", "{data}"],
        ["P-1", "ml-team/classification"],
    ),
]


def refuse_track(cli, world: dict[str, str], args: list[str], words: list[str]) -> None:
    filled = [arg.format(**world) if "{" in arg else arg for arg in args]
    assert_refused(cli, ["--project", "p", *filled], words)


@pytest.mark.backend_independent
@pytest.mark.parametrize(
    ("args", "words"), [c[1:] for c in ARGUMENT_CASES], ids=[c[0] for c in ARGUMENT_CASES]
)
def test_track_refusal_of_arguments(
    cli, world: dict[str, str], args: list[str], words: list[str]
) -> None:
    refuse_track(cli, world, args, words)


@pytest.mark.parametrize(
    ("args", "words"), [c[1:] for c in STORE_CASES], ids=[c[0] for c in STORE_CASES]
)
def test_track_refusal_by_the_store(
    cli, world: dict[str, str], args: list[str], words: list[str]
) -> None:
    refuse_track(cli, world, args, words)


@pytest.mark.backend_independent
def test_missing_project_is_refused(cli, world: dict[str, str]) -> None:
    assert_refused(cli, ["track", "f", world["data"]], ["project"])


@pytest.mark.backend_independent
def test_invalid_project_is_refused(cli, world: dict[str, str]) -> None:
    assert_refused(cli, ["--project", "a/b/c", "track", "f", world["data"]], ["project"])
    assert_refused(cli, ["--project", "../x", "track", "f", world["data"]], ["project"])
    # An empty one is refused as such, not taken for "none given" (which said to pass one,
    # or took the environment's, or listed every project's runs).
    for args in (["track", "f", world["data"]], ["runs"]):
        assert_refused(cli, ["--project", "", *args], ["invalid project ''"])


def test_read_only_run_is_refused(world: dict[str, str]) -> None:
    before = store_counts()
    run = artifactfs.init_run(with_id="P-1", mode="read-only")
    with pytest.raises(artifactfs.ArtifactfsError, match="read-only"):
        run["data"].track_files(world["xdir"])
    with pytest.raises(artifactfs.ArtifactfsError, match="read-only"):
        run["other"].track_files(world["xdir"])
    assert store_counts() == before


@pytest.mark.backend_independent
@pytest.mark.parametrize(
    "destination", ["../up", "a/../../b", "/abs", "a\x00b", "d" * 256, "é" * 128]
)
def test_api_refuses_destinations_escaping_the_tree(
    world: dict[str, str], destination: str
) -> None:
    run = artifactfs.init_run(with_id="P-1")
    before = store_counts()
    hash_before = run["data"].fetch_hash()
    with pytest.raises(artifactfs.ArtifactfsError):
        run["data"].track_files(world["data"], destination=destination)
    with pytest.raises(artifactfs.ArtifactfsError):
        run["new"].track_files(world["data"], destination=destination)
    assert store_counts() == before
    assert run["data"].fetch_hash() == hash_before


@pytest.mark.backend_independent
@pytest.mark.parametrize("location", ["", "ftp://h/x", "{data}/*.csv", "{tmp}/missing", "s3://b/*"])
def test_api_refusals_leave_no_run_and_no_field(world: dict[str, str], location: str) -> None:
    run = artifactfs.init_run(with_id="P-1")
    before = store_counts()
    with pytest.raises(artifactfs.ArtifactfsError):
        run["new"].track_files(location.format(**world))
    assert store_counts() == before
    assert Store().get_run("P-1").fields == ("data",)


def test_api_refuses_file_and_directory(world: dict[str, str]) -> None:
    run = artifactfs.init_run(with_id="P-2")
    before = store_counts()
    with pytest.raises(artifactfs.ArtifactfsError, match="both a file and a directory"):
        run["fd"].track_files(world["xdir"])
    with pytest.raises(artifactfs.ArtifactfsError, match="both a file and a directory"):
        run["fd"].track_files(world["y_file"], destination="x")
    assert store_counts() == before


@pytest.mark.s3
def test_a_location_refused_for_its_own_paths_leaves_no_new_run(
    cli, world: dict[str, str], s3: Any
) -> None:
    """Objects `x` and `x/y` under one prefix: `x` would be both a file and a directory. The
    CLI makes a new run for a `track` without `--run`; the refusal must not leave it behind."""
    s3.put("conf/x", b"x is an object")
    s3.put("conf/x/y", b"and so is x/y")
    assert_refused(cli, ["--project", "p", "track", "f", s3.url("conf")], ["'x'", "x/y"])
