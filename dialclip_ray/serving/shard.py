"""The IndexShard deployment: one per shard (``Shard{i}``), each autoscaled on its own.

Replicas of one deployment are interchangeable, so a deployment holds one shard
number: shard ``i`` of every modality's sub-index. Concurrent requests are batched
into one FAISS search per modality (a matrix product instead of many vector ones).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve


@serve.deployment(name="Shard", max_ongoing_requests=8, ray_actor_options={"num_cpus": 0.1})
class IndexShard:
    def __init__(self, index_dir: str, shard: int, index_identity: dict[str, Any], use_gpu: bool = False,
                 threads: int = 1, delay_s: float = 0.0):
        import faiss

        from dialclip_ray.index import ShardSearcher
        from dialclip_ray.index.layout import IndexLayout, IndexMismatchError

        faiss.omp_set_num_threads(threads)
        layout = IndexLayout.load(index_dir)
        if layout.identity != index_identity:
            raise IndexMismatchError(f"Shard{shard}: {index_dir} changed since the app was built")
        self.shard, self.delay_s = shard, delay_s
        self.searchers = {t: ShardSearcher(Path(index_dir) / t, shard, m, use_gpu=use_gpu)
                          for t, m in layout.manifests.items() if shard < len(m.shards)}

    async def ping(self) -> int:
        """Liveness probe of the ingress's cool-off (a shard marked down is probed, not searched)."""
        return self.shard

    async def search(self, target: str, query: np.ndarray, k: int) -> dict[str, Any]:
        """Top-k of this shard for one query: scores, global labels, metadata rows (id + columns)."""
        return await self._search_batch((target, query, k))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _search_batch(self, items: list[tuple[str, np.ndarray, int]]) -> list[dict[str, Any]]:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return await asyncio.to_thread(self._search, items)

    def _search(self, items: list[tuple[str, np.ndarray, int]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{} for _ in items]
        for target in {t for t, _, _ in items}:
            rows = [i for i, (t, _, _) in enumerate(items) if t == target]
            if target not in self.searchers:
                for i in rows:
                    out[i] = {"error": f"Shard{self.shard} holds no {target} vectors"}
                continue
            searcher = self.searchers[target]
            k_max = max(items[i][2] for i in rows)
            hits = searcher.search(np.stack([items[i][1] for i in rows]), k_max)
            for row, i in enumerate(rows):
                k = items[i][2]
                labels = hits.labels[row, :k]
                valid = labels[labels >= 0]
                out[i] = {"scores": hits.scores[row, :k].copy(), "labels": labels.copy(),
                          "metadata": dict(zip(valid.tolist(), searcher.metadata(valid)))}
        return out
