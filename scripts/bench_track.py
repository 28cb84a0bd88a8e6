#!/usr/bin/env python3
"""Benchmark: tracking 10,000 local files of 16 KiB, beside `sha1sum` over the same files.

Prints the median of a few repeats for: sha1sum (the peer), a first `artifactfs track` (fresh
store and hash cache), and a re-track of the unchanged tree (hash cache warm), as times and as
ratios. Targets: first track within 1.5x sha1sum; re-track at least 10x faster than first track.
Every run uses the real CLI in a child process, so start-up time is counted too.

    .venv/bin/python scripts/bench_track.py [--files 10000] [--size 16384] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARTIFACTFS = [sys.executable, "-m", "artifactfs"]


def make_files(root: Path, count: int, size: int) -> None:
    per_dir = 100
    for index in range(count):
        directory = root / f"d{index // per_dir:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{index:05d}.bin").write_bytes(os.urandom(size))


def timed(command: list[str], env: dict[str, str], **kwargs: object) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True, **kwargs)
    return time.perf_counter() - start, result.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=16 * 1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="artifactfs-bench-track-"))
    try:
        data = work / "data"
        make_files(data, args.files, args.size)
        file_list = work / "files.txt"
        file_list.write_bytes(
            b"\0".join(str(p).encode() for p in sorted(data.rglob("*.bin"))) + b"\0"
        )
        env = dict(os.environ)
        sha1sum_times, first_times, retrack_times = [], [], []
        for repeat in range(args.repeats):
            # sha1sum over the same files, also from a warm page cache.
            with open(file_list, "rb") as names:
                elapsed, _ = timed(["xargs", "-0", "sha1sum"], env, stdin=names)
            sha1sum_times.append(elapsed)

            home = work / f"home{repeat}"
            env["XDG_CACHE_HOME"] = str(home / "cache")
            store = str(home / "store.db")
            elapsed, out = timed(
                [
                    *ARTIFACTFS,
                    "--store",
                    store,
                    "--project",
                    "bench/track",
                    "track",
                    "data",
                    str(data),
                ],
                env,
            )
            first_times.append(elapsed)
            run_id = out.strip().splitlines()[-1]
            elapsed, _ = timed(
                [*ARTIFACTFS, "--store", store, "track", "--run", run_id, "data", str(data)], env
            )
            retrack_times.append(elapsed)

        sha1sum_s = statistics.median(sha1sum_times)
        first_s = statistics.median(first_times)
        retrack_s = statistics.median(retrack_times)
        total_mb = args.files * args.size / 1e6
        print(
            f"# track {args.files} files of {args.size} bytes ({total_mb:.0f} MB), "
            f"median of {args.repeats}, {os.cpu_count()} cores"
        )
        print("| what | seconds | ratio |")
        print("|---|---|---|")
        print(f"| sha1sum (peer) | {sha1sum_s:.2f} | 1.00 |")
        print(
            f"| artifactfs track, first | {first_s:.2f} | {first_s / sha1sum_s:.2f}x sha1sum "
            f"(target <= 1.5x) |"
        )
        print(
            f"| artifactfs track, unchanged re-track | {retrack_s:.2f} | "
            f"{first_s / retrack_s:.1f}x faster than first (target >= 10x) |"
        )
        ok = first_s <= 1.5 * sha1sum_s and first_s >= 10 * retrack_s
        print("targets met" if ok else "targets MISSED")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
