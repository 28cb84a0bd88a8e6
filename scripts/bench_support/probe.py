"""One measurement in a child process: the benchmark runs it with a timeout, so nothing hangs.

    python probe.py KIND JSON_ARGS   ->   prints one JSON object on stdout

Every figure is timed here, inside the child, so interpreter start-up is not counted. The S3
kinds use boto3 with the variables the parent sets (AWS_ENDPOINT_URL and the keys).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import get_context
from typing import Any

BUFFER = 1024 * 1024


def _read_whole(path: str, buffer: bytearray) -> int:
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            count = os.readv(fd, [buffer])
            if count == 0:
                return total
            total += count
    finally:
        os.close(fd)


def seq(args: dict[str, Any]) -> dict[str, Any]:
    """Read one file from start to end in 1 MiB reads."""
    buffer = bytearray(BUFFER)
    start = time.perf_counter()
    total = _read_whole(args["path"], buffer)
    seconds = time.perf_counter() - start
    return {"bytes": total, "seconds": seconds}


def ttfb(args: dict[str, Any]) -> dict[str, Any]:
    """open() and the first byte of a file."""
    start = time.perf_counter()
    fd = os.open(args["path"], os.O_RDONLY)
    try:
        first = os.read(fd, 1)
    finally:
        seconds = time.perf_counter() - start
        os.close(fd)
    return {"bytes": len(first), "seconds": seconds}


def random_offsets(size: int, count: int, seed: int, block: int = 4096) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(size // block) * block for _ in range(count)]


def pread_random(args: dict[str, Any]) -> dict[str, Any]:
    """fio's randread without fio: `count` 4 KiB preads at seeded offsets, one at a time."""
    offsets = random_offsets(args["size"], args["count"], args["seed"])
    latencies = []
    fd = os.open(args["path"], os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        start = time.perf_counter()
        deadline = start + args.get("limit", 600)
        for offset in offsets:
            began = time.perf_counter_ns()
            os.pread(fd, 4096, offset)
            latencies.append(time.perf_counter_ns() - began)
            if time.perf_counter() > deadline:
                break
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
    latencies.sort()
    return {
        "ios": len(latencies),
        "seconds": seconds,
        "iops": len(latencies) / seconds,
        "mean_ms": sum(latencies) / len(latencies) / 1e6,
        "median_ms": latencies[len(latencies) // 2] / 1e6,
    }


def _read_list(job: tuple[str, list[str]]) -> tuple[int, int]:
    root, names = job
    buffer = bytearray(BUFFER)
    total = 0
    for name in names:
        total += _read_whole(os.path.join(root, name), buffer)
    return len(names), total


def _noop(_: int) -> int:
    return os.getpid()


def scan(args: dict[str, Any]) -> dict[str, Any]:
    """Read every listed file whole: one reader in order, or N processes (a DataLoader's way:
    worker i reads items i, i+N, ...)."""
    with open(args["list"]) as handle:
        names = handle.read().splitlines()
    workers = args["workers"]
    if workers == 1:
        start = time.perf_counter()
        files, total = _read_list((args["root"], names))
        seconds = time.perf_counter() - start
    else:
        with get_context("fork").Pool(workers) as pool:
            pool.map(_noop, range(workers * 4))  # every worker started before the clock
            jobs = [(args["root"], names[i::workers]) for i in range(workers)]
            start = time.perf_counter()
            results = pool.map(_read_list, jobs, chunksize=1)
            seconds = time.perf_counter() - start
        files = sum(r[0] for r in results)
        total = sum(r[1] for r in results)
    return {"files": files, "bytes": total, "seconds": seconds}


def stats(args: dict[str, Any]) -> dict[str, Any]:
    """stat() each listed path once; per-call latencies."""
    with open(args["list"]) as handle:
        names = handle.read().splitlines()
    latencies = []
    start = time.perf_counter()
    for name in names:
        began = time.perf_counter_ns()
        os.stat(os.path.join(args["root"], name))
        latencies.append(time.perf_counter_ns() - began)
    seconds = time.perf_counter() - start
    latencies.sort()
    return {
        "count": len(latencies),
        "seconds": seconds,
        "median_ms": latencies[len(latencies) // 2] / 1e6,
        "p95_ms": latencies[int(len(latencies) * 0.95)] / 1e6,
    }


# -- boto3, the limit -------------------------------------------------------------------------


def _client() -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        response_checksum_validation="when_required",
        request_checksum_calculation="when_required",
        s3={"addressing_style": "path"},
        max_pool_connections=32,
        retries={"max_attempts": 3, "mode": "standard"},
    )
    return boto3.client("s3", config=config)


def s3_download(args: dict[str, Any]) -> dict[str, Any]:
    """boto3's own download_file (its default transfer settings) to a file on tmpfs."""
    client = _client()
    start = time.perf_counter()
    client.download_file(args["bucket"], args["key"], args["target"])
    seconds = time.perf_counter() - start
    size = os.path.getsize(args["target"])
    os.unlink(args["target"])
    return {"bytes": size, "seconds": seconds}


def s3_ttfb(args: dict[str, Any]) -> dict[str, Any]:
    client = _client()
    client.list_buckets()  # connect first: a mount is connected once it is ready
    start = time.perf_counter()
    response = client.get_object(Bucket=args["bucket"], Key=args["key"])
    first = response["Body"].read(1)
    seconds = time.perf_counter() - start
    response["Body"].close()
    return {"bytes": len(first), "seconds": seconds}


def s3_random(args: dict[str, Any]) -> dict[str, Any]:
    """The same seeded 4 KiB reads as ranged GETs, one at a time."""
    client = _client()
    offsets = random_offsets(args["size"], args["count"], args["seed"])
    latencies = []
    start = time.perf_counter()
    deadline = start + args.get("limit", 600)
    for offset in offsets:
        began = time.perf_counter_ns()
        client.get_object(
            Bucket=args["bucket"], Key=args["key"], Range=f"bytes={offset}-{offset + 4095}"
        )["Body"].read()
        latencies.append(time.perf_counter_ns() - began)
        if time.perf_counter() > deadline:
            break
    seconds = time.perf_counter() - start
    latencies.sort()
    return {
        "ios": len(latencies),
        "seconds": seconds,
        "iops": len(latencies) / seconds,
        "mean_ms": sum(latencies) / len(latencies) / 1e6,
        "median_ms": latencies[len(latencies) // 2] / 1e6,
    }


def s3_scan(args: dict[str, Any]) -> dict[str, Any]:
    """GET every listed object whole, with 1 or N threads on one client."""
    client = _client()
    with open(args["list"]) as handle:
        keys = [args["prefix"] + name for name in handle.read().splitlines()]

    def get(key: str) -> int:
        return len(client.get_object(Bucket=args["bucket"], Key=key)["Body"].read())

    client.list_buckets()
    start = time.perf_counter()
    if args["workers"] == 1:
        total = sum(get(key) for key in keys)
    else:
        with ThreadPoolExecutor(args["workers"]) as pool:
            total = sum(pool.map(get, keys))
    seconds = time.perf_counter() - start
    return {"files": len(keys), "bytes": total, "seconds": seconds}


def s3_list(args: dict[str, Any]) -> dict[str, Any]:
    """The listing `find -ls` needs, straight from the server: every key, size and time."""
    client = _client()
    start = time.perf_counter()
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=args["bucket"], Prefix=args["prefix"]
    ):
        count += len(page.get("Contents", []))
    seconds = time.perf_counter() - start
    return {"count": count, "seconds": seconds}


KINDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "seq": seq,
    "ttfb": ttfb,
    "pread_random": pread_random,
    "scan": scan,
    "stats": stats,
    "s3_download": s3_download,
    "s3_ttfb": s3_ttfb,
    "s3_random": s3_random,
    "s3_scan": s3_scan,
    "s3_list": s3_list,
}


if __name__ == "__main__":
    result = KINDS[sys.argv[1]](json.loads(sys.argv[2]))
    print(json.dumps(result))
