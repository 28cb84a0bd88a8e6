"""`python -m artifactfs`, the same as the `artifactfs` command."""

from artifactfs.cli import entry_point

entry_point()
