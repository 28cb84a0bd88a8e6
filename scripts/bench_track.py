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
from typing import BinaryIO

ARTIFACTFS = [sys.executable, "-m", "artifactfs"]


def make_files(root: Path, count: int, size: int) -> None:
    per_dir = 100
    for index in range(count):
        directory = root / f"d{index // per_dir:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{index:05d}.bin").write_bytes(os.urandom(size))


def timed(
    command: list[str], env: dict[str, str], stdin: BinaryIO | None = None
) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(
        command, env=env, stdin=stdin, capture_output=True, text=True, check=True
    )
    return time.perf_counter() - start, result.stdout


# The API as a training script calls it: one interpreter, two track_files() calls timed.
API_CHILD = """
import sys, time, artifactfs
run = artifactfs.init_run(project="bench/api", store=sys.argv[1])
def timed_track():
    start = time.perf_counter()
    run["data"].track_files(sys.argv[2])
    return time.perf_counter() - start
print(timed_track(), timed_track())
"""


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
        times: dict[str, list[float]] = {
            "sha1sum": [],
            "api_first": [],
            "api_again": [],
            "cli_first": [],
            "cli_again": [],
        }
        for repeat in range(args.repeats):
            # sha1sum over the same files, also from a warm page cache.
            with open(file_list, "rb") as names:
                elapsed, _ = timed(["xargs", "-0", "sha1sum"], env, stdin=names)
            times["sha1sum"].append(elapsed)

            env["XDG_CACHE_HOME"] = str(work / f"api{repeat}" / "cache")
            _, out = timed(
                [sys.executable, "-c", API_CHILD, str(work / f"api{repeat}.db"), str(data)], env
            )
            first, again = (float(x) for x in out.split())
            times["api_first"].append(first)
            times["api_again"].append(again)

            env["XDG_CACHE_HOME"] = str(work / f"cli{repeat}" / "cache")
            store = str(work / f"cli{repeat}.db")
            track = [*ARTIFACTFS, "--store", store, "--project", "bench/cli", "track"]
            elapsed, out = timed([*track, "data", str(data)], env)
            times["cli_first"].append(elapsed)
            run_id = out.strip().splitlines()[-1]
            elapsed, _ = timed([*track, "--run", run_id, "data", str(data)], env)
            times["cli_again"].append(elapsed)

        med = {name: statistics.median(values) for name, values in times.items()}
        total_mb = args.files * args.size / 1e6
        print(
            f"# track {args.files} files of {args.size} bytes ({total_mb:.0f} MB), "
            f"median of {args.repeats}, {os.cpu_count()} cores"
        )
        print("| what | seconds | ratio |")
        print("|---|---|---|")
        print(f"| sha1sum over the files (peer) | {med['sha1sum']:.3f} | 1.00 |")
        for kind, label in (("api", "track_files() in Python"), ("cli", "artifactfs track (CLI)")):
            first, again = med[f"{kind}_first"], med[f"{kind}_again"]
            print(f"| {label}, first | {first:.3f} | {first / med['sha1sum']:.2f}x sha1sum |")
            print(
                f"| {label}, unchanged again | {again:.3f} | first/again = {first / again:.1f}x |"
            )
        api_first, api_again = med["api_first"], med["api_again"]
        print(
            f"targets (API): first <= 1.5x sha1sum: {api_first / med['sha1sum']:.2f}x; "
            f"re-track >= 10x faster: {api_first / api_again:.1f}x"
        )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
