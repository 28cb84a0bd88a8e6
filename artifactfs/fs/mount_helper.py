"""`mount.artifactfs`: the helper mount(8) calls for fstab lines of type `artifactfs`.

    postgresql://mount@db/artifacts  /mnt/runs  artifactfs  _netdev,cache_size=50G  0 0

mount(8) runs `mount.artifactfs SPEC DIR -o OPTIONS`; SPEC is the store (a URI, a path, or
`default`). Options of our own: run, field, cache_dir, cache_size, chunk_size,
read_deadline, log_file, allow_other; mount(8)'s own (defaults, _netdev, nofail, noauto, ro,
x-systemd.*, ...) are ignored here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from artifactfs.cache.location import parse_size
from artifactfs.errors import ArtifactfsError
from artifactfs.fs import daemon

_IGNORED = {"defaults", "_netdev", "nofail", "noauto", "auto", "ro", "rw", "user", "users"}
_IGNORED |= {"nouser", "owner", "group", "sync", "async", "silent", "loud"}
# mount(8) adds noexec, nosuid and nodev to a `user`/`users` line. They hold here whatever is
# asked: files are 0444 (nothing to execute, no set-id bit) and none is a device.
_IGNORED |= {"noexec", "exec", "nosuid", "suid", "nodev", "dev"}
_IGNORED |= {"atime", "noatime", "relatime", "norelatime", "strictatime", "nodiratime", "diratime"}
_IGNORED_PREFIXES = ("x-systemd.", "x-", "comment=")


def options_from(spec: str, mountpoint: str, option_text: str) -> daemon.MountOptions:
    options = daemon.MountOptions(
        mountpoint=mountpoint, store_uri=None if spec in ("default", "artifactfs") else spec
    )
    for item in filter(None, option_text.split(",")):
        name, _, value = item.partition("=")
        if name in _IGNORED or item.startswith(_IGNORED_PREFIXES):
            continue
        if name == "allow_other":
            if item != name:  # `allow_other=0` must not turn it on
                raise ArtifactfsError(f"mount option allow_other takes no value: {item!r}")
            options.allow_other = True
        elif name in ("run", "field", "cache_dir", "log_file") and value:
            setattr(options, {"run": "run_id", "field": "field_path"}.get(name, name), value)
        elif name == "cache_size" and value:
            options.cache_size = parse_size(value)
        elif name == "chunk_size" and value:
            options.chunk_size = daemon.parse_chunk_size(value)
        elif name == "read_deadline" and value:
            options.read_deadline = daemon.parse_read_deadline(value)
        else:
            raise ArtifactfsError(f"unknown mount option {item!r}")
    if options.field_path and not options.run_id:
        raise ArtifactfsError("the field option needs the run option")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    option_text = ""
    positional = []
    fake = False
    while args:
        arg = args.pop(0)
        if arg == "-o" and args:
            option_text = ",".join(filter(None, [option_text, args.pop(0)]))
        elif arg == "-f":
            fake = True  # `mount -f`: everything but the mount itself
        elif arg.startswith("-"):
            continue  # -s, -n, -v from mount(8): nothing to do for them
        else:
            positional.append(arg)
    try:
        if len(positional) != 2:
            raise ArtifactfsError("usage: mount.artifactfs STORE MOUNTPOINT [-o OPTIONS]")
        options = options_from(positional[0], positional[1], option_text)
        if not fake:
            daemon.mount(options, foreground=False)
    except ArtifactfsError as exc:
        print(f"mount.artifactfs: {exc}", file=sys.stderr)
        return 32  # mount(8)'s "mount failure"
    return 0


def entry_point() -> None:
    sys.exit(main())
