"""Sharded FAISS retrieval index: manifest, index factory, build/search/merge (README: Ray topology, FAISS shards)."""

from dialclip_ray.index.factory import KINDS, default_nlist, gpu_available, make_index, validate_params
from dialclip_ray.index.manifest import MANIFEST_NAME, IndexManifest, IndexManifestError, ShardEntry
from dialclip_ray.index.shards import (
    ShardedIndex,
    ShardHits,
    ShardSearcher,
    build_sharded_index,
    merge_hits,
    merge_topk,
)

__all__ = [
    "KINDS", "MANIFEST_NAME", "default_nlist", "IndexManifest", "IndexManifestError", "ShardEntry", "ShardHits", "ShardSearcher",
    "ShardedIndex", "build_sharded_index", "gpu_available", "make_index", "merge_hits", "merge_topk",
    "validate_params",
]
