"""A circuit breaker for endpoints that keep refusing connections.

A chunk fetch retries transient failures until its deadline (30 s by default). With an endpoint
down (connection refused, no such host, connect timed out), every file would pay that deadline
in turn: `cp -r` of 64 files through the mount failed one file every half minute. So once a
fetch has given up because connections to an endpoint kept failing to be made, the breaker is
open for it: later fetches from it get one attempt each, no retries, for as long as connecting
keeps failing. The first fetch from it that succeeds closes the breaker. An endpoint that is
down then costs each file one refused connection, and one that comes back is used at once: each
fetch's one attempt is the probe, so no timer is needed.

Only failures to connect count (`ConnectFailedError`): a server that answers slowly, or with
errors, is retried as usual, breaker or not.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


def breaker_key(source_url: str) -> str:
    """What a breaker is kept for: the scheme and bucket of a source URL (`s3://bucket`).

    By bucket, not by endpoint: the bucket is in every entry's URL, while the endpoint a fetch
    goes to is the source's business (on AWS a bucket is a host of its own, in its region), and
    a bucket never spans endpoints. So a dead endpoint never makes reads of a bucket elsewhere
    fail fast; the price is one full deadline per bucket on it, not per file."""
    scheme, _, rest = source_url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


class ConnectBreaker:
    """Which buckets' endpoints have been refusing connections (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[str] = set()

    def is_open(self, key: str) -> bool:
        """Whether fetches from `key` should not be retried when they cannot connect."""
        with self._lock:
            return key in self._open

    def trip(self, key: str, endpoint: str) -> None:
        """A fetch from `key` gave up: connections to `endpoint` kept failing to be made."""
        with self._lock:
            opened = key not in self._open
            self._open.add(key)
        if opened:
            log.warning(
                "%s: connections to %s keep failing: reads from it are tried once, not "
                "retried, until one succeeds",
                key,
                endpoint,
            )

    def reset(self, key: str) -> None:
        """A fetch from `key` succeeded: its endpoint takes connections again."""
        with self._lock:
            if key not in self._open:
                return
            self._open.discard(key)
        log.warning("%s: reads succeed again: retried as usual", key)
