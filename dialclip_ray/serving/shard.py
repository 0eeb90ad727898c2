"""The IndexShard deployment: one per shard (``Shard{i}``), each autoscaled on its own.

Replicas of one deployment are interchangeable, so a deployment holds one shard
number: shard ``i`` of every modality's sub-index. Concurrent requests are batched
(``@serve.batch``) into one FAISS search per (modality, version, knobs): a matrix
product instead of many vector ones.

Hot swaps: every call names the index version (``index_id``) the ingress pinned for
that request, and the replica answers from exactly that version, loading it from its
directory on first use (the ingress pre-loads it through ``load`` before switching).
It keeps the two newest versions, so requests pinned to the old one finish while the
new one serves: no answer mixes versions.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

KEEP_VERSIONS = 2


@serve.deployment(name="Shard", max_ongoing_requests=8, ray_actor_options={"num_cpus": 0.1})
class IndexShard:
    def __init__(self, index_dir: str, shard: int, index_identity: dict[str, Any], use_gpu: bool = False,
                 threads: int = 1, delay_s: float = 0.0):
        import faiss

        from dialclip_ray.serving.metrics import ShardMetrics

        faiss.omp_set_num_threads(threads)
        self.shard, self.delay_s, self.use_gpu, self.identity = shard, delay_s, use_gpu, index_identity
        self.versions: OrderedDict[str, dict] = OrderedDict()
        self._loading: dict[str, asyncio.Future] = {}
        self.metrics = ShardMetrics()
        version, searchers = self._load(index_dir)
        self.versions[version] = searchers
        self.default_version = version

    def _load(self, index_dir: str) -> tuple[str, dict]:
        from dialclip_ray.index import ShardSearcher
        from dialclip_ray.index.layout import IndexLayout, IndexMismatchError

        layout = IndexLayout.load(index_dir)
        if layout.identity != self.identity:
            raise IndexMismatchError(f"Shard{self.shard}: {layout.directory.name} was built from another checkpoint "
                                     f"than the app serves (redeploy the app to change checkpoints)")
        return layout.index_id, {t: ShardSearcher(layout.directory / t, self.shard, m, use_gpu=self.use_gpu)
                                 for t, m in layout.manifests.items() if self.shard < len(m.shards)}

    async def ping(self) -> int:
        """Liveness probe of the ingress's cool-off and /readyz (a shard marked down is probed, not searched)."""
        return self.shard

    async def load(self, version: str, index_dir: str) -> str:
        """Load ``version`` (from ``index_dir``) unless held; returns its id. Concurrent loads share one."""
        if version in self.versions:
            self.versions.move_to_end(version)
            return version
        if version not in self._loading:
            self._loading[version] = asyncio.ensure_future(asyncio.to_thread(self._load, index_dir))
        try:
            got, searchers = await asyncio.shield(self._loading[version])
        finally:
            if self._loading.get(version) is not None and self._loading[version].done():
                self._loading.pop(version, None)
        if got != version:
            raise ValueError(f"Shard{self.shard}: {Path(index_dir).name} holds version {got}, not {version}")
        self.versions[version] = searchers
        while len(self.versions) > KEEP_VERSIONS:
            self.versions.popitem(last=False)
        return version

    async def search(self, target: str, query: np.ndarray, k: int, knobs: dict[str, int] | None = None,
                     version: str | None = None, index_dir: str | None = None) -> dict[str, Any]:
        """Top-k of this shard for one query: scores, global labels, metadata rows (id + columns), version."""
        version = version or self.default_version
        if version not in self.versions:
            if index_dir is None:
                return {"error": f"Shard{self.shard} does not hold index version {version}"}
            await self.load(version, index_dir)
        return await self._search_batch((target, query, k, tuple(sorted((knobs or {}).items())), version))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _search_batch(self, items: list[tuple]) -> list[dict[str, Any]]:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self.metrics.batch_size.observe(len(items))
        return await asyncio.to_thread(self._search, items)

    def _search(self, items: list[tuple]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{} for _ in items]
        groups: dict[tuple, list[int]] = {}
        for i, (target, _, _, knobs, version) in enumerate(items):
            groups.setdefault((target, knobs, version), []).append(i)
        for (target, knobs, version), rows in groups.items():
            searchers = self.versions.get(version)
            if searchers is None or target not in searchers:
                what = f"index version {version}" if searchers is None else f"{target} vectors"
                for i in rows:
                    out[i] = {"error": f"Shard{self.shard} holds no {what}"}
                continue
            searcher = searchers[target]
            k_max = max(items[i][2] for i in rows)
            t0 = time.perf_counter()
            try:
                hits = searcher.search(np.stack([items[i][1] for i in rows]), k_max, knobs=dict(knobs) or None)
            except ValueError as err:  # knobs outside the bounds (the ingress checks first): the request's fault
                for i in rows:
                    out[i] = {"error": str(err), "status": 422}
                continue
            self.metrics.search_ms.observe((time.perf_counter() - t0) * 1000)
            for row, i in enumerate(rows):
                k = items[i][2]
                labels = hits.labels[row, :k]
                valid = labels[labels >= 0]
                out[i] = {"scores": hits.scores[row, :k].copy(), "labels": labels.copy(), "version": version,
                          "metadata": dict(zip(valid.tolist(), searcher.metadata(valid)))}
        return out
