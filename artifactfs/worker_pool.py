"""Thread pools for one block of work, and running such work where a Ctrl-C can stop it."""

from __future__ import annotations

import _thread
import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from artifactfs.errors import StoppedError

T = TypeVar("T")
R = TypeVar("R")

WAIT_STEP = 0.1  # seconds between looks at whether the work has ended, as well


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[ThreadPoolExecutor]:
    """A pool for one block of work. Leaving the block waits for the calls running, not for
    those queued: `with ThreadPoolExecutor()` runs every submitted call first, so a download
    stopped while `pool.map` was still submitting its 20,000 files wrote them all first."""
    pool = ThreadPoolExecutor(workers)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def map_interruptibly(
    job: Callable[[T, threading.Event], R],
    items: Sequence[T],
    workers: int,
    on_result: Callable[[T, R], None],
) -> None:
    """`job(item, stop)` for every item on `workers` threads; `on_result(item, result)` for
    each, in the items' order, on one thread. A Ctrl-C stops it as `interruptible` says: the
    calls under way end (a job that looks at `stop` may end early: its result is not used),
    no other starts, and no further result is handed on. An error raised by a job or by
    `on_result` stops the others the same way, and is raised."""

    def run_all(stop: threading.Event) -> None:
        def run_one(item: T) -> R | None:
            # `pool.map` queues every item at once and the workers go on taking them while
            # the results are waited for in order: one taken after the Ctrl-C is not started.
            # Its None is never handed on: the loop below sees `stop` first.
            return None if stop.is_set() else job(item, stop)

        with worker_pool(workers) as pool:
            try:
                for item, result in zip(items, pool.map(run_one, items), strict=True):
                    if stop.is_set():
                        return
                    on_result(item, result)  # type: ignore[arg-type]  # not stopped: an R
            except BaseException:
                stop.set()  # a job's or on_result's error: the jobs under way end early too
                raise

    interruptible(run_all)


def raise_if_stopped(stop: threading.Event | None) -> None:
    """Between two pieces of one long job (hashing or copying a 10 GB file): a Ctrl-C does
    not wait for the rest of it."""
    if stop is not None and stop.is_set():
        raise StoppedError


def interruptible(work: Callable[[threading.Event], T]) -> T:
    """`work(stop)` on a thread of its own, the calling thread waiting for it; on a Ctrl-C
    (KeyboardInterrupt, or any exception raised in the waiting thread) `stop` is set, the
    work is waited for, and the exception raised.

    A Ctrl-C is raised in the main thread wherever it is. Inside a pool's submit() it can leave
    a lock of the pool's taken for good (Python code takes it: `with self._cond`), and every
    worker then waits on it forever: a download hung that way. The waiting thread here takes
    no lock of Python code: it waits on a bare lock that the work releases when it ends, and
    looks at a list the work appends to before (a `Thread.join` interrupted on Python 3.11
    marks the thread ended while it still runs).
    Work that outlives the process (a second Ctrl-C) ends with it, as a daemon thread.
    `work` checks `stop` between its steps and returns early when it is set."""
    stop = threading.Event()
    ended: list[tuple[T | None, BaseException | None]] = []

    done = _thread.allocate_lock()  # a bare lock, released by the work's thread when it ends
    done.acquire()

    def run() -> None:
        try:
            ended.append((work(stop), None))
        except BaseException as exc:  # handed to the waiting thread, raised there
            ended.append((None, exc))
        finally:
            done.release()

    try:
        # Not threading.Thread: its start() waits on a lock-taking Event, where a Ctrl-C
        # could leave the lock taken and the new thread stuck before it runs `work`.
        _thread.start_new_thread(run, ())
        _wait_for(ended, done)
    except BaseException as exc:  # a Ctrl-C; or SystemExit from a SIGTERM handler
        if isinstance(exc, RuntimeError) and exc.args == ("can't start new thread",):
            raise  # no thread: nothing to stop
        # A signal is raised as the call that started the thread returns, inside this try:
        # so the thread exists, and is stopped and waited for.
        stop.set()
        _wait_for(ended, done)  # the calls under way end; a second Ctrl-C leaves them be
        raise
    result, failure = ended[0]
    if failure is not None:
        raise failure
    return result  # type: ignore[return-value]  # None only with a failure


def _wait_for(ended: list[Any], done: _thread.LockType) -> None:
    while not ended:
        done.acquire(timeout=WAIT_STEP)
