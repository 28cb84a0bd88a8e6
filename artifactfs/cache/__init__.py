"""The bounded on-disk chunk cache for remote bytes."""

from artifactfs.cache.chunks import CacheBusyError, CacheStats, ChunkCache, cache_usage, chunk_key

__all__ = ["CacheBusyError", "CacheStats", "ChunkCache", "cache_usage", "chunk_key"]
