"""The QueryEncoder deployment: dynamic batching of dialogs into one ``encode_query`` call.

Image decoding is bounded and kept off the batch path: each request's images are
checked from their headers first (per-request pixel budget), then decoded in a thread
pool while holding their pixel count of the replica's budget, one task per image. A
request without images goes straight to the batch, so a few requests carrying many
large images cannot hold up the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from dialclip_ray.serving.schemas import RetrieveRequest

logger = logging.getLogger("ray.serve")


class PixelBudget:
    """Decoded pixels in flight on one replica: ``hold(n)`` waits until ``n`` more fit (first come, first
    served; a request larger than the whole budget runs alone)."""

    def __init__(self, total: int):
        self.total, self.used = total, 0
        self._cond = asyncio.Condition()
        self._queue: list[object] = []

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int):
        if pixels <= 0:
            yield
            return
        me = object()
        async with self._cond:
            self._queue.append(me)
            try:
                await self._cond.wait_for(lambda: self._queue[0] is me and
                                          (self.used + pixels <= self.total or self.used == 0))
            finally:
                self._queue.remove(me)
                self._cond.notify_all()
            self.used += pixels
        try:
            yield
        finally:
            async with self._cond:
                self.used -= pixels
                self._cond.notify_all()


@serve.deployment(name="QueryEncoder", max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.25})
class QueryEncoder:
    """Loads the checkpoint once; refuses to start when it is not the checkpoint the index was built with."""

    def __init__(self, checkpoint: str, corpus_dirs: list[str], index_identity: dict[str, Any], dim: int,
                 use_gpu: bool = False, threads: int = 1, max_image_pixels: int = 16_000_000,
                 feature_cache_entries: int = 50_000, max_request_pixels: int = 32_000_000,
                 pixel_budget: int = 64_000_000, decode_threads: int = 2):
        import torch

        from dialclip_ray.index.layout import check_identity, checkpoint_identity
        from dialclip_ray.serving.dialogs import DialogEncoder

        torch.set_num_threads(threads)
        check_identity(checkpoint_identity(checkpoint), index_identity, f"QueryEncoder({checkpoint})")
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.encoder = DialogEncoder(checkpoint, corpus_dirs, device, max_image_pixels, feature_cache_entries)
        if self.encoder.embed_dim != dim:
            raise ValueError(f"QueryEncoder({checkpoint}): model embeds into {self.encoder.embed_dim} dims, "
                             f"the index holds {dim}-dim vectors")
        self.max_request_pixels = min(max_request_pixels, pixel_budget)
        self.pixel_budget = pixel_budget
        self._budget: PixelBudget | None = None  # made on the replica's event loop
        # Headers (cheap) and decoding (heavy) in separate pools: a header check never queues behind a decode.
        self._headers = ThreadPoolExecutor(1, thread_name_prefix="image-headers")
        self._decoders = ThreadPoolExecutor(decode_threads, thread_name_prefix="image-decode")
        self._tags = itertools.count()
        from dialclip_ray.serving.metrics import EncoderMetrics

        self.metrics = EncoderMetrics()

    async def ping(self) -> bool:
        """Liveness probe of the ingress's cool-off."""
        return True

    async def encode(self, request: RetrieveRequest) -> dict[str, Any]:
        from dialclip_ray.serving.dialogs import RequestError

        try:
            prepared = await self._prepare(request)
        except RequestError as err:
            return {"error": err.message, "status": err.status}
        except Exception as err:  # a bug, not the request: logged, answered 500 without taking the batch down
            logger.exception("preparing a query failed")
            return {"error": f"query preparation failed ({type(err).__name__})", "status": 500}
        return await self._encode_batch(prepared)

    async def _prepare(self, req: RetrieveRequest):
        tag = f"q{next(self._tags)}"
        if not any(t.images for t in req.context):
            return self.encoder.assemble(req, tag, [])
        loop = asyncio.get_running_loop()
        jobs = await loop.run_in_executor(self._headers, self.encoder.plan, req, self.max_request_pixels)
        if self._budget is None:
            self._budget = PixelBudget(self.pixel_budget)
        async with self._budget.hold(sum(j.pixels for j in jobs)):
            # All decodes finish (or fail) before the budget is released; the first failure names its image.
            tensors = await asyncio.gather(*(loop.run_in_executor(self._decoders, self.encoder.load, j)
                                             for j in jobs), return_exceptions=True)
        for t in tensors:
            if isinstance(t, BaseException):
                raise t
        return self.encoder.assemble(req, tag, tensors)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, prepared: list) -> list[dict[str, Any]]:
        # The forward pass runs in a thread so the replica's event loop keeps collecting the next batch.
        out = await asyncio.to_thread(self.encoder.forward, prepared)
        cache = self.encoder.feature_cache
        self.metrics.cache(cache.hits, cache.misses)
        return out
