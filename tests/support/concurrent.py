"""Eight threads released at once by a barrier, each calling `work(i)`: results or exceptions."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_at_once(
    work: Callable[[int], bytes], count: int = 8, timeout: float = 60
) -> list[bytes | BaseException]:
    barrier = threading.Barrier(count, timeout=10)
    results: list[bytes | BaseException] = [b""] * count

    def run(index: int) -> None:
        try:
            barrier.wait()
            results[index] = work(index)
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return results
