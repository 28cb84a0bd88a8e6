"""A write that waits long says so once, and one that does not wait says nothing."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from artifactfs.store.slow_wait import said_if_slow


def notices(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "artifactfs.store.slow_wait"]


def test_a_block_still_running_at_its_deadline_is_told_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    with said_if_slow("waiting for the lock", after=0.1):
        time.sleep(0.5)
    assert notices(caplog) == ["waiting for the lock"]


def test_blocks_that_end_in_time_say_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    for _ in range(1000):
        with said_if_slow("never said", after=0.2):
            pass
    time.sleep(0.4)  # past every deadline
    assert notices(caplog) == []


def test_each_of_several_blocks_is_told_at_its_own_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A later block with an earlier deadline is told first: the one thread that keeps the
    deadlines wakes for it."""
    caplog.set_level(logging.WARNING)
    told_at: dict[str, float] = {}
    began = time.monotonic()

    def slow(name: str, after: float, runs_for: float) -> None:
        with said_if_slow(name, after=after):
            time.sleep(runs_for)

    threads = [
        threading.Thread(target=slow, args=("long wait", 1.0, 1.5)),
        threading.Thread(target=slow, args=("short wait", 0.2, 1.5)),
        threading.Thread(target=slow, args=("ended in time", 0.6, 0.1)),
    ]
    handler = logging.Handler()
    handler.emit = lambda record: told_at.setdefault(  # type: ignore[method-assign]
        record.getMessage(), time.monotonic() - began
    )
    logging.getLogger("artifactfs.store.slow_wait").addHandler(handler)
    try:
        for thread in threads:
            thread.start()
            time.sleep(0.05)
        for thread in threads:
            thread.join()
    finally:
        logging.getLogger("artifactfs.store.slow_wait").removeHandler(handler)
    assert sorted(notices(caplog)) == ["long wait", "short wait"]
    assert told_at["short wait"] < 0.6, told_at  # not held back until the long one's deadline
    assert told_at["long wait"] >= 1.0, told_at


def test_a_forked_child_is_told_too() -> None:
    """A DataLoader worker forked after the parent wrote to the store: the parent's watchdog
    thread does not exist in the child."""
    with said_if_slow("parent's", after=5.0):
        pass  # the parent's watchdog thread now runs
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it was told, then leave without pytest's clean-up
        told: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: told.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger("artifactfs.store.slow_wait").addHandler(handler)
        with said_if_slow("child's", after=0.1):
            time.sleep(0.5)
        os.write(write_end, repr(told).encode())
        os._exit(0)
    os.close(write_end)
    try:
        report = os.read(read_end, 1000).decode()
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert report == '["child\'s"]'


def test_a_log_handler_that_fails_once_does_not_silence_later_notices(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The one watchdog thread ended with the handler's error, and no later write was told."""
    caplog.set_level(logging.WARNING)
    failures = ["once"]

    def fails_once(record: logging.LogRecord) -> bool:
        if failures:
            failures.pop()
            raise RuntimeError("a broken log handler")
        return True

    logger = logging.getLogger("artifactfs.store.slow_wait")
    logger.addFilter(fails_once)
    try:
        with said_if_slow("lost to the broken handler", after=0.1):
            time.sleep(0.4)
        with said_if_slow("told all the same", after=0.1):
            time.sleep(0.4)
    finally:
        logger.removeFilter(fails_once)
    assert notices(caplog) == ["told all the same"]


def test_the_watchdog_thread_ends_when_idle_and_a_later_write_is_told_all_the_same(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread kept for good made every process that tracked a multi-threaded one, which
    its DataLoader workers were then forked from."""
    from artifactfs.store import slow_wait

    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(slow_wait, "IDLE_EXIT", 0.2)

    def watchdog_running() -> bool:
        return any(t.name == "artifactfs-slow-wait" for t in threading.enumerate())

    with said_if_slow("never said", after=5.0):
        assert watchdog_running()
    deadline = time.monotonic() + 10
    while watchdog_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not watchdog_running()
    with said_if_slow("told by a new thread", after=0.1):
        time.sleep(0.4)
    assert notices(caplog) == ["told by a new thread"]
