"""Exceptions that carry a message meant for the user.

The CLI turns every `ArtifactfsError` into one line on stderr and its `exit_code`; anything
else is a bug and keeps its traceback.
"""


class ArtifactfsError(Exception):
    """Bad usage or input: nothing was changed. Exit code 2."""

    exit_code = 2


class StoppedError(ArtifactfsError):
    """Work given up part-way because a Ctrl-C asked it to stop; its result is not used."""

    def __init__(self) -> None:
        super().__init__("stopped")


class NotFoundError(ArtifactfsError):
    """A run, field, project or source location that does not exist."""


class NotKeptError(ArtifactfsError, AttributeError):
    """Neptune's metadata API beyond artifacts (`run["lr"] = 0.1`, `.append`, `.upload`): not
    kept here. An AttributeError too, so `hasattr` stays False for those names."""


class CredentialsError(ArtifactfsError):
    """A remote source was named but no credentials for it could be found."""


class CheckFailedError(ArtifactfsError):
    """A source no longer holds the tracked bytes (verify, download). Exit code 1."""

    exit_code = 1


class SourceChangedError(CheckFailedError):
    """The bytes at a source differ from what was tracked, or are gone."""

    def __init__(self, source_url: str, reason: str) -> None:
        super().__init__(f"{source_url}: {reason}")
        self.source_url = source_url
        self.reason = reason


class UnreadableSourceError(SourceChangedError):
    """The source refuses every read (access denied, a bucket not found at the endpoint): a
    read fails for good, as for a changed source, but `verify` cannot tell whether the bytes
    are still the tracked ones (the usual cause is the setup: credentials, an endpoint)."""


class AccessDeniedError(UnreadableSourceError):
    """The source refuses this user (403, a file it may not read)."""


class TransientSourceError(ArtifactfsError):
    """A source could not be read this time (network, throttling, timeouts): worth a retry."""


class ConnectFailedError(TransientSourceError):
    """No connection to the source's endpoint could be made (refused, no such host, connect
    timed out): the request never reached a server. Not a timeout of an answer under way."""

    def __init__(self, message: str, endpoint: str) -> None:
        super().__init__(message)
        self.endpoint = endpoint  # as the user set it: `http://127.0.0.1:9000`
