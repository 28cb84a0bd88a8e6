"""Path validation: which entry paths may enter (and leave) the store, and why others may not."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from artifactfs.entries import InvalidPathError, path_problem, validate_path

ACCEPTED = [
    "a",
    "a.csv",
    "dir/sub/file.txt",
    "données/é.csv",
    "日本.txt",
    "with space/file name.txt",
    " leading and trailing ",
    "...",
    "..a",
    "a..",
    ".hidden/.x",
    "a\\..\\b",  # a backslash is an ordinary character in a POSIX name
    "x" * 255,
    "é" * 127 + "a",  # 255 bytes
    "日" * 85,  # 255 bytes
    "/".join(["d" * 255] * 16),  # 4095 bytes
]

# (path, words that the reason must contain)
REFUSED = [
    ("", "empty"),
    ("..", "'..'"),
    ("../x", "'..'"),
    ("a/../b", "'..'"),
    ("a/..", "'..'"),
    ("/abs", "absolute"),
    ("/", "absolute"),
    ("//x", "absolute"),
    ("a//b", "empty path segment"),
    ("a/", "empty path segment"),
    ("a/b/", "empty path segment"),
    ("a\x00b", "NUL"),
    ("\x00", "NUL"),
    (".", "'.'"),
    ("./a", "'.'"),
    ("a/./b", "'.'"),
    ("x" * 256, "255 bytes"),
    ("ok/" + "x" * 256 + "/ok", "255 bytes"),
    ("é" * 128, "255 bytes"),  # 128 characters, 256 bytes
    ("日" * 86, "255 bytes"),  # 86 characters, 258 bytes
    ("a/" + "é" * 128, "255 bytes"),
]


@pytest.mark.parametrize("path", ACCEPTED)
def test_accepted(path: str) -> None:
    assert path_problem(path) is None
    assert validate_path(path) == path


@pytest.mark.parametrize(("path", "reason"), REFUSED)
def test_refused_with_reason(path: str, reason: str) -> None:
    problem = path_problem(path)
    assert problem is not None
    assert reason in problem
    with pytest.raises(InvalidPathError) as caught:
        validate_path(path)
    assert caught.value.path == path
    assert caught.value.reason == problem
    assert reason in str(caught.value)
    assert repr(path) in str(caught.value)


def test_lone_surrogate_is_refused() -> None:
    # Not encodable as UTF-8 (e.g. from a store written by someone else).
    assert path_problem("a/\udcff") is not None


def test_not_a_string_is_refused() -> None:
    assert path_problem(b"a") is not None  # type: ignore[arg-type]
    assert path_problem(None) is not None  # type: ignore[arg-type]


# -- properties -------------------------------------------------------------------------------

SEGMENT_ALPHABET = st.characters(
    blacklist_categories=("Cs",), blacklist_characters="/"
)  # any character a segment could hold, including NUL
segments = st.one_of(
    st.sampled_from(["", ".", "..", "...", "a", "é", "日本", " ", "\x00", "x" * 255, "é" * 128]),
    st.text(SEGMENT_ALPHABET, min_size=0, max_size=12),
)
paths = st.one_of(
    st.lists(segments, min_size=1, max_size=6).map("/".join),
    st.lists(segments, min_size=1, max_size=6).map(lambda parts: "/" + "/".join(parts)),
    st.text(max_size=30),
)

ROOT = "/srv/artifact-root"


@settings(max_examples=500, deadline=None)
@given(paths)
def test_accepted_paths_stay_under_the_root(path: str) -> None:
    if "\x00" in path:
        assert path_problem(path) is not None
        return
    if path_problem(path) is not None:
        return
    joined = os.path.normpath(os.path.join(ROOT, path))
    assert joined.startswith(ROOT + "/")
    # ... and name exactly the path given: nothing is collapsed away.
    assert os.path.relpath(joined, ROOT) == path


@settings(max_examples=300, deadline=None)
@given(paths)
def test_refused_paths_are_refused_by_validate_path(path: str) -> None:
    problem = path_problem(path)
    if problem is None:
        assert validate_path(path) == path
    else:
        with pytest.raises(InvalidPathError):
            validate_path(path)


@settings(max_examples=300, deadline=None)
@given(st.lists(segments, min_size=0, max_size=4), st.lists(segments, min_size=0, max_size=4))
def test_a_dot_dot_segment_is_always_refused(before: list[str], after: list[str]) -> None:
    assert path_problem("/".join([*before, "..", *after])) is not None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(SEGMENT_ALPHABET, min_size=1, max_size=20), min_size=1, max_size=5))
def test_segments_within_limits_are_accepted(parts: list[str]) -> None:
    path = "/".join(parts)
    expected_ok = (
        all(p not in (".", "..") and "\x00" not in p for p in parts)
        and all(len(p.encode("utf-8")) <= 255 for p in parts)
        and len(path.encode("utf-8")) <= 4096
    )
    assert (path_problem(path) is None) == expected_ok
