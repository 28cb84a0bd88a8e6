#!/usr/bin/env python3
"""Micro-benchmark: ChunkCache.read (format 2) against plain os.pread of the same bytes.

    .venv/bin/python scripts/bench_cache.py [--dir /tmp] [--chunks 16] [--repeats 3]
                                            [--random-reads 20000] [--passes 4]

Fills a cache of 8 MiB chunks under --dir and writes the same payloads as plain files next to
it (the peer), reads everything once so that both sit in the page cache (the case after a
remount on a warm machine), then times, in one run:

- 1 MiB slices: every chunk read in 1 MiB pieces, in order (the kernel's READs with a raised
  read_ahead_kb), --passes times over;
- 4 KiB random slices: --random-reads reads at random offsets of random chunks, the same
  offsets for everyone;
- whole chunks: `get` of every chunk against one pread of the whole file.

The peer is `os.pread` on descriptors opened beforehand: no header, no checks, no open per
read, so it is the floor, not a rival. For reference, "format 1" emulates what a cache read
from disk cost before format 2: read the whole chunk file, SHA-256 the payload, slice it (it
is slow, so it does one pass of the 1 MiB slices and a fiftieth of the random reads; rates are
per read, so they compare).
Every figure is the median of --repeats runs (the three are interleaved in each run); the
ratios are of those medians: "v2 / peer" is v2's speed as a fraction of the peer's (1.0: as
fast), "v2 / format 1" how many times faster v2 is than the old path.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import crc32c

from artifactfs.cache.chunks import BLOCK, ChunkCache, chunk_key, header_size

MiB = 1024 * 1024
CHUNK = 8 * MiB
SMALL = 4096


def filesystem_of(path: Path) -> str:
    """The type of the filesystem `path` is on, from /proc/mounts (longest mount point)."""
    best, kind = "", "unknown"
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1]
            if str(path).startswith(point) and len(point) > len(best):
                best, kind = point, fields[2]
    return kind


def timed(action: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    nbytes = action()
    return time.perf_counter() - start, nbytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--random-reads", type=int, default=20_000)
    parser.add_argument("--passes", type=int, default=4)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=args.dir))
    try:
        return run(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(root: Path, args: argparse.Namespace) -> int:
    print(
        f"python {sys.version.split()[0]}, crc32c hardware-based: {crc32c.hardware_based}, "
        f"{root} on {filesystem_of(root)}, {os.cpu_count()} CPUs"
    )
    print(
        f"{args.chunks} chunks of {CHUNK // MiB} MiB, blocks of {BLOCK // MiB} MiB, "
        f"header {header_size(CHUNK)} bytes; median of {args.repeats}"
    )
    cache = ChunkCache(root / "cache", 4 * args.chunks * CHUNK, free_floor_bytes=0)
    plain = root / "plain"
    plain.mkdir()
    keys = [
        chunk_key("S3", f"bench-{n:04d}", args.chunks * CHUNK, CHUNK, n) for n in range(args.chunks)
    ]
    rng = random.Random(1)
    for n, key in enumerate(keys):
        payload = rng.randbytes(CHUNK)
        if not cache.put(key, payload):
            raise SystemExit(f"the cache refused chunk {n}")
        (plain / str(n)).write_bytes(payload)
    # The chunk files themselves, for the format 1 emulation only.
    chunk_files = [root / "cache" / "chunks" / key.hex()[:2] / key.hex() for key in keys]
    fds = [os.open(plain / str(n), os.O_RDONLY) for n in range(args.chunks)]
    try:
        return measure(cache, keys, chunk_files, fds, args)
    finally:
        for fd in fds:
            os.close(fd)


def measure(
    cache: ChunkCache,
    keys: list[bytes],
    chunk_files: list[Path],
    fds: list[int],
    args: argparse.Namespace,
) -> int:
    count = len(keys)
    rng = random.Random(2)
    random_reads = [
        (rng.randrange(count), rng.randrange(CHUNK - SMALL + 1)) for _ in range(args.random_reads)
    ]
    big_reads = [(n, offset) for n in range(count) for offset in range(0, CHUNK, MiB)]
    big_reads *= args.passes

    # Same bytes everywhere, checked once; this also brings every file into the page cache.
    for n, key in enumerate(keys):
        assert cache.get(key) == os.pread(fds[n], CHUNK, 0), f"chunk {n} differs"
        format_1_slice(chunk_files[n], 0, 1)
    for n, offset in random_reads[:200]:
        assert cache.read(keys[n], offset, SMALL) == os.pread(fds[n], SMALL, offset)

    def v2_reads(reads: list[tuple[int, int]], size: int) -> Callable[[], int]:
        def action() -> int:
            total = 0
            for n, offset in reads:
                data = cache.read(keys[n], offset, size)
                assert data is not None
                total += len(data)
            return total

        return action

    def peer_reads(reads: list[tuple[int, int]], size: int) -> Callable[[], int]:
        def action() -> int:
            total = 0
            for n, offset in reads:
                total += len(os.pread(fds[n], size, offset))
            return total

        return action

    def v1_reads(reads: list[tuple[int, int]], size: int) -> Callable[[], int]:
        def action() -> int:
            total = 0
            for n, offset in reads:
                total += len(format_1_slice(chunk_files[n], offset, size))
            return total

        return action

    def v2_whole() -> int:
        total = 0
        for key in keys:
            data = cache.get(key)
            assert data is not None
            total += len(data)
        return total

    def peer_whole() -> int:
        return sum(len(os.pread(fd, CHUNK, 0)) for fd in fds)

    def v1_whole() -> int:
        return sum(len(format_1_slice(path, 0, CHUNK)) for path in chunk_files)

    workloads = {
        "1 MiB slices": (
            v2_reads(big_reads, MiB),
            peer_reads(big_reads, MiB),
            v1_reads(big_reads[: count * (CHUNK // MiB)], MiB),  # slow: one pass
        ),
        "4 KiB random slices": (
            v2_reads(random_reads, SMALL),
            peer_reads(random_reads, SMALL),
            # The old path is slow: a fiftieth of the reads (rates are per read).
            v1_reads(random_reads[: max(1, len(random_reads) // 50)], SMALL),
        ),
        "whole 8 MiB chunks": (v2_whole, peer_whole, v1_whole),
    }
    print()
    header = (
        f"{'workload':<22} {'peer os.pread':>16} {'v2 read':>16} {'format 1 (emul.)':>18} "
        f"{'v2 / peer':>10} {'v2 / format 1':>14}"
    )
    print(header)
    print("-" * len(header))
    for name, (v2, peer, v1) in workloads.items():
        # Bytes per second for the big reads; reads per second for the small ones.
        per_read = SMALL if name.startswith("4 KiB") else 1
        rates: dict[str, list[float]] = {"peer": [], "v2": [], "v1": []}
        for _ in range(args.repeats):
            for label, action in (("peer", peer), ("v2", v2), ("v1", v1)):
                seconds, nbytes = timed(action)
                rates[label].append(nbytes / per_read / seconds)
        median = {label: statistics.median(values) for label, values in rates.items()}
        cells = [
            f"{median[label]:,.0f} reads/s" if per_read > 1 else f"{median[label] / 1e6:,.0f} MB/s"
            for label in ("peer", "v2", "v1")
        ]
        print(
            f"{name:<22} {cells[0]:>16} {cells[1]:>16} {cells[2]:>18} "
            f"{median['v2'] / median['peer']:>10.3g} {median['v2'] / median['v1']:>14.3g}"
        )
    return 0


def format_1_slice(path: Path, offset: int, size: int) -> bytes:
    """What a disk hit cost in format 1: the whole file read and its payload SHA-256'd."""
    raw = path.read_bytes()
    start = header_size(CHUNK)  # the v2 file stands in for a v1 one: same bytes to hash
    payload = raw[start:]
    hashlib.sha256(payload).digest()
    return payload[offset : offset + size]


if __name__ == "__main__":
    raise SystemExit(main())
