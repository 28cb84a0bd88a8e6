"""Where the artifactfs daemon spent its time, from `bench.py --profile` files (py-spy raw).

    .venv/bin/python scripts/bench_support/profile_summary.py DIR_OR_FILE... [--top N]

For each file: the active samples (threads waiting for work or for a fetch are left out) by
the part of the daemon they were in, then the functions that were on the stack most often.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

RATE = 200  # samples per second: bench.py records with --rate 200

# Stacks ending here are threads with nothing to do, or waiting for another thread.
IDLE_LEAVES = ("WorkerThread._work", "_worker", "EpollIOManager.get_events", "Condition.wait")

# First match wins: the parts of the daemon a sample can be in.
PARTS = [
    ("S3 client creation (first use)", "s3_client"),
    ("S3 GET (botocore)", "S3Source._get"),
    ("cache: put (write + CRC32C per block)", "ChunkCache.put"),
    ("cache: read (blocks + their CRC32C)", "ChunkCache._read"),
    ("whole-file hash check", "_check_whole_file"),
    ("content hash of a fetched chunk", "ContentCheck"),
    ("store: lookup", "Tree.lookup"),
    ("store: listing", "Tree.children"),
    ("readdir replies", "ArtifactOperations.readdir"),
    ("xattrs", "_all_xattrs"),
    ("attributes", "_entry_attributes"),
    ("reading the response body", "read_range"),
]

FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _function(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    return f"{match['function']} ({match['file'].rsplit('/', 1)[-1]})"


def summarize(path: Path, top: int) -> str:
    parts: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = active = 0
    for line in path.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack_text.split(";")
        total += count
        if _function(frames[-1]).split(" (")[0] in IDLE_LEAVES:
            continue
        active += count
        joined = ";".join(frames)
        part = next((name for name, marker in PARTS if marker in joined), None)
        parts[part or "other: " + _function(frames[-1])] += count
        for function in {_function(f) for f in frames}:
            inclusive[function] += count
    lines = [f"== {path.name}: {active / RATE:.2f}s active thread time ({total} samples)"]
    for name, count in parts.most_common(top):
        lines.append(f"  {100 * count / max(active, 1):5.1f}%  {count / RATE:7.2f}s  {name}")
    lines.append("  -- on the stack most often")
    for name, count in inclusive.most_common(top):
        lines.append(f"  {100 * count / max(active, 1):5.1f}%  {name}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    for path in args.paths:
        files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
        for file in files:
            print(summarize(file, args.top))


if __name__ == "__main__":
    main()
