"""Helpers of scripts/bench.py: the S3 server, the mounts under test, and the measurements."""
