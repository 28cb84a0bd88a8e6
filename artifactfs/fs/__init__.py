"""The read-only mount: `tree` (names, attributes, xattrs), `fuse_ops` (pyfuse3), `daemon`."""
