"""A pool's queued work is dropped when its block ends by an exception (a Ctrl-C), and a
Ctrl-C stops work run by `interruptible` and `map_interruptibly`."""

from __future__ import annotations

import _thread
import threading
import time
from typing import Any

import pytest

from artifactfs.worker_pool import interruptible, map_interruptibly, worker_pool


def test_an_interrupted_block_runs_the_calls_under_way_and_drops_the_queued() -> None:
    """A download interrupted while it was still submitting its files wrote them all."""
    started: list[int] = []
    finished: list[int] = []
    lock = threading.Lock()
    # The calls under way wait until well after the interrupt: on a busy machine, calls that
    # merely took a while could end, and others start, before it (no fault of the pool's).
    release = threading.Event()

    def work(n: int) -> None:
        with lock:
            started.append(n)
        release.wait(10.0)
        with lock:
            finished.append(n)

    releaser = threading.Timer(0.5, release.set)
    with pytest.raises(KeyboardInterrupt), worker_pool(2) as pool:
        for n in range(200):
            pool.submit(work, n)
        releaser.start()
        raise KeyboardInterrupt  # as the signal would, between two submissions
    releaser.join()
    assert len(started) == 2, started  # the two under way; none of the queued ones
    assert sorted(finished) == sorted(started)  # those under way were waited for


def test_a_block_that_ends_well_has_every_call_done() -> None:
    with worker_pool(3) as pool:
        results = list(pool.map(lambda n: n * n, range(100)))
    assert results == [n * n for n in range(100)]


def test_a_ctrl_c_sets_stop_waits_for_the_work_and_is_raised() -> None:
    """The interrupt lands in the waiting thread's join, not inside the work's locks."""
    seen: list[str] = []

    def work(stop: threading.Event) -> str:
        _thread.interrupt_main()  # a Ctrl-C, while the work runs
        if not stop.wait(5.0):
            seen.append("never stopped")
            return "ran to its end"
        time.sleep(0.1)  # winding down: the caller must wait for this
        seen.append("stopped")
        return "stopped early"

    with pytest.raises(KeyboardInterrupt):
        interruptible(work)
    assert seen == ["stopped"]


def test_work_that_ends_gives_its_result_or_raises_its_error() -> None:
    assert interruptible(lambda stop: 42) == 42

    def failing(stop: threading.Event) -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        interruptible(failing)


def test_a_ctrl_c_raised_as_the_thread_starts_still_stops_the_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A signal is raised as the call that started the thread returns: the work went on to
    its end (a whole download, after the user saw the KeyboardInterrupt)."""
    from artifactfs import worker_pool as module

    real_start = _thread.start_new_thread

    def start_then_interrupted(function: Any, args: Any) -> None:
        real_start(function, args)
        raise KeyboardInterrupt  # as the pending SIGINT's handler would, right here

    monkeypatch.setattr(module._thread, "start_new_thread", start_then_interrupted)
    seen: list[str] = []

    def work(stop: threading.Event) -> None:
        seen.append("stopped" if stop.wait(5.0) else "ran to its end")

    with pytest.raises(KeyboardInterrupt):
        interruptible(work)
    assert seen == ["stopped"]


def test_a_map_hands_every_result_on_in_the_items_order() -> None:
    seen: list[tuple[int, int]] = []

    def slow_for_small(n: int, stop: threading.Event) -> int:
        time.sleep(0.01 * (10 - n))  # the first items end last
        return n * n

    map_interruptibly(slow_for_small, range(10), 4, lambda n, square: seen.append((n, square)))
    assert seen == [(n, n * n) for n in range(10)]


def test_a_ctrl_c_stops_a_map_with_no_result_handed_on_after_it() -> None:
    """What `download` and `verify` rely on: after a Ctrl-C no file is counted or reported,
    and the files queued are not started."""
    started: list[int] = []
    handed_on: list[int] = []

    def job(n: int, stop: threading.Event) -> int:
        started.append(n)
        if n == 3:
            _thread.interrupt_main()  # a Ctrl-C while the fourth item runs
        time.sleep(0.3)  # longer than the waiting thread takes to see the Ctrl-C
        return n

    with pytest.raises(KeyboardInterrupt):
        map_interruptibly(job, range(200), 2, lambda n, result: handed_on.append(n))
    assert len(started) <= 8, started  # not the 200
    assert handed_on == list(range(len(handed_on)))
    assert len(handed_on) <= 3, handed_on  # none after the Ctrl-C: the fourth's came after it


def test_a_job_that_looks_at_stop_ends_at_the_ctrl_c() -> None:
    """A download abandons a large file under way, rather than copy the rest of it first."""
    ended: list[str] = []

    def long_job(n: int, stop: threading.Event) -> None:
        if n == 0:
            _thread.interrupt_main()
        ended.append("stopped" if stop.wait(30) else "ran to its end")

    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        map_interruptibly(long_job, range(2), 2, lambda n, result: None)
    assert ended == ["stopped", "stopped"]
    assert time.monotonic() - began < 10  # not the jobs' 30 s


def test_no_queued_job_starts_after_a_ctrl_c_while_an_earlier_one_runs_on() -> None:
    """`pool.map` queues every item; while the loop waited for the first item's result (a
    check that cannot stop early), the other worker went on taking the queued ones: 469 of
    500 started after the Ctrl-C."""
    after_ctrl_c: list[int] = []
    interrupted = threading.Event()

    def job(n: int, stop: threading.Event) -> None:
        if interrupted.is_set() and stop.is_set():
            after_ctrl_c.append(n)
        if n == 0:
            time.sleep(1.0)  # under way, deaf to `stop`
        elif n == 1:
            interrupted.set()
            _thread.interrupt_main()
            stop.wait(5)  # returns once the Ctrl-C has reached the waiting thread
        else:
            time.sleep(0.001)

    with pytest.raises(KeyboardInterrupt):
        map_interruptibly(job, range(500), 2, lambda n, result: None)
    assert after_ctrl_c == []


def test_an_error_of_one_job_stops_the_others_and_is_raised() -> None:
    """A download whose one file failed with an unexpected error copied the other large
    files under way to their end before the error was raised."""
    ended: list[str] = []

    def job(n: int, stop: threading.Event) -> None:
        if n == 0:
            time.sleep(0.1)
            raise ValueError("unexpected")
        ended.append("stopped" if stop.wait(5) else "ran to its end")

    with pytest.raises(ValueError, match="unexpected"):
        map_interruptibly(job, range(3), 3, lambda n, result: None)
    assert ended == ["stopped", "stopped"]
