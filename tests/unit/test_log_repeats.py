"""A log line repeated many times a second is written once per window, then with the count of
its repeats held back: the daemon's log grew by thousands of identical EIO lines a second."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from artifactfs import log_repeats
from artifactfs.log_repeats import RepeatFilter, report_held_back


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def repeats(clock: Clock) -> RepeatFilter:
    return RepeatFilter(window=10.0, clock=clock)


@pytest.fixture
def logged(repeats: RepeatFilter) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger with one handler, as the daemon's file (and, in the foreground, a second
    one as its stderr: `two_handlers`)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(repeats)
    logger = logging.getLogger(f"test_log_repeats.{id(out)}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield logger, out
    logger.removeHandler(handler)


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_a_line_repeated_within_the_window_is_written_once_then_counted(
    logged: tuple[logging.Logger, io.StringIO], clock: Clock
) -> None:
    logger, out = logged
    for _ in range(1000):
        logger.error("EIO: %s: %s", "s3://b/k", "fetch timed out")
        clock.now += 0.001  # 1,000 a second
    assert lines(out) == ["ERROR EIO: s3://b/k: fetch timed out"]
    clock.now += 10.0
    logger.error("EIO: %s: %s", "s3://b/k", "fetch timed out")
    assert lines(out)[1:] == [
        "ERROR EIO: s3://b/k: fetch timed out (and 999 more times since it was last written)"
    ]
    clock.now += 10.0
    logger.error("EIO: %s: %s", "s3://b/k", "fetch timed out")  # none held back since
    assert lines(out)[2:] == ["ERROR EIO: s3://b/k: fetch timed out"]


def test_other_lines_and_other_levels_are_not_held_back_by_it(
    logged: tuple[logging.Logger, io.StringIO], clock: Clock
) -> None:
    logger, out = logged
    logger.error("EIO: a")
    logger.error("EIO: b")
    logger.warning("EIO: a")
    logger.error("EIO: a")
    clock.now += 1.0
    logger.info("mounted")
    assert lines(out) == ["ERROR EIO: a", "ERROR EIO: b", "WARNING EIO: a", "INFO mounted"]


def test_the_lines_remembered_are_bounded(
    logged: tuple[logging.Logger, io.StringIO], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log_repeats, "MAX_LINES", 100)
    logger, out = logged
    for n in range(1000):
        logger.error("EIO: file %d", n)
    logger.error("EIO: file 0")  # let go long since: written again
    logger.error("EIO: file 999")  # the newest: held back
    assert len(lines(out)) == 1001
    repeats = [f for h in logger.handlers for f in h.filters if isinstance(f, RepeatFilter)]
    assert [len(f._windows) for f in repeats] == [100]


def test_a_second_handler_gets_the_same_lines_with_the_same_counts(
    logged: tuple[logging.Logger, io.StringIO], repeats: RepeatFilter, clock: Clock
) -> None:
    """`mount --foreground` logs to the file and to stderr: the second handler saw the
    first one's rewritten line as a new one, and let repeats through with old counts."""
    logger, out = logged
    stderr = io.StringIO()
    second = logging.StreamHandler(stderr)
    second.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    second.addFilter(repeats)
    logger.addHandler(second)
    try:
        for when in (0, 1, 2, 11, 11.5, 12, 22, 22.5, 23):
            clock.now = 1000.0 + when
            logger.error("EIO: s3://b/k")
    finally:
        logger.removeHandler(second)
    said = "ERROR EIO: s3://b/k (and 2 more times since it was last written)"
    assert lines(out) == ["ERROR EIO: s3://b/k", said, said]
    assert lines(stderr) == lines(out)


def test_the_lines_held_back_at_the_end_are_reported_with_their_counts(
    logged: tuple[logging.Logger, io.StringIO], repeats: RepeatFilter, clock: Clock
) -> None:
    """A burst that never comes back was never told of: 40,000 failures said as one."""
    logger, out = logged
    for _ in range(40_000):
        logger.error("EIO: %s", "s3://b/k2")
    logger.warning("once")
    report_held_back(repeats)
    assert lines(out) == [
        "ERROR EIO: s3://b/k2",
        "WARNING once",
        "ERROR EIO: s3://b/k2 (and 39999 more times since it was last written)",
    ]
    report_held_back(repeats)  # told once
    assert len(lines(out)) == 3
