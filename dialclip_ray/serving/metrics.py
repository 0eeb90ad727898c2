"""Prometheus metrics of the retrieval app, through Ray's metrics system (``ray.serve.metrics``).

Ray exports them, with the ``ray_`` prefix and Serve's application/deployment/replica tags
added, from every node's metrics agent (``ray start --metrics-export-port``, or
``ray.init(_metrics_export_port=...)``); docs/serving.md says how to point Prometheus and
Grafana at it. One class per deployment, made in the replica's constructor (Ray metrics
must be created in the process that records them).
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
STAGES = ("encode", "search", "merge", "total")


class IngressMetrics:
    def __init__(self):
        self.requests = Counter("dialclip_requests", "HTTP requests answered, by route and status code",
                                tag_keys=("endpoint", "status"))
        self.latency = Histogram("dialclip_stage_latency_ms", "Latency of one request's stage (encode, search "
                                 "= shard fan-out, merge, total) in ms", boundaries=LATENCY_MS, tag_keys=("stage",))
        self.partial = Counter("dialclip_partial_answers", "Answers that lack some shards (allow_partial)")
        self.shard_down = Counter("dialclip_shard_down_events", "A shard or the encoder marked down (its call "
                                  "failed even after the retry, or no replica took it)", tag_keys=("callee",))
        self.retries = Counter("dialclip_retries", "Encoder/shard calls retried once after a replica died",
                               tag_keys=("callee",))
        self.index_version = Gauge("dialclip_index_version", "1 for the index version this ingress serves "
                                   "(0 for the one it served before)", tag_keys=("version",))
        self.swaps = Counter("dialclip_index_swaps", "Index versions switched to while serving")

    def request(self, route: str, status: int) -> None:
        self.requests.inc(tags={"endpoint": route, "status": str(status)})

    def stage(self, stage: str, ms: float) -> None:
        self.latency.observe(ms, tags={"stage": stage})


class EncoderMetrics:
    def __init__(self):
        self.cache_hit_ratio = Gauge("dialclip_feature_cache_hit_ratio", "Share of turn/image features served "
                                     "from the QueryEncoder replica's feature cache since it started")
        self.cache_lookups = Counter("dialclip_feature_cache_lookups", "Feature-cache lookups by result",
                                     tag_keys=("result",))
        self._seen = (0, 0)

    def cache(self, hits: int, misses: int) -> None:
        """Record the cache's running totals (``FeatureCache.hits`` / ``misses``)."""
        dh, dm = hits - self._seen[0], misses - self._seen[1]
        self._seen = (hits, misses)
        if dh > 0:
            self.cache_lookups.inc(dh, tags={"result": "hit"})
        if dm > 0:
            self.cache_lookups.inc(dm, tags={"result": "miss"})
        if hits + misses:
            self.cache_hit_ratio.set(hits / (hits + misses))


class ShardMetrics:
    def __init__(self):
        self.batch_size = Histogram("dialclip_shard_batch_size", "Queries per FAISS search (@serve.batch)",
                                    boundaries=[1, 2, 4, 8, 16, 32])
        self.search_ms = Histogram("dialclip_shard_search_ms", "One batched FAISS search in ms",
                                   boundaries=LATENCY_MS)
