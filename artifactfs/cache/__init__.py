"""The bounded on-disk chunk cache for remote bytes."""

from artifactfs.cache.chunks import (
    CacheBusyError,
    CacheFormatError,
    CacheStats,
    CacheUnusableError,
    ChunkCache,
    cache_usage,
    chunk_key,
)

__all__ = [
    "CacheBusyError",
    "CacheFormatError",
    "CacheStats",
    "CacheUnusableError",
    "ChunkCache",
    "cache_usage",
    "chunk_key",
]
