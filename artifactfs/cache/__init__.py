"""The bounded on-disk chunk cache for remote bytes."""

from artifactfs.cache.chunks import CacheStats, ChunkCache, chunk_key

__all__ = ["CacheStats", "ChunkCache", "chunk_key"]
