"""The QueryEncoder deployment: dynamic batching of dialogs into one ``encode_query`` call."""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from dialclip_ray.serving.schemas import RetrieveRequest


@serve.deployment(name="QueryEncoder", max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.25})
class QueryEncoder:
    """Loads the checkpoint once; refuses to start when it is not the checkpoint the index was built with."""

    def __init__(self, checkpoint: str, corpus_dirs: list[str], index_identity: dict[str, Any], dim: int,
                 use_gpu: bool = False, threads: int = 1, max_image_pixels: int = 16_000_000):
        import torch

        from dialclip_ray.index.layout import check_identity, checkpoint_identity
        from dialclip_ray.serving.dialogs import DialogEncoder

        torch.set_num_threads(threads)
        check_identity(checkpoint_identity(checkpoint), index_identity, f"QueryEncoder({checkpoint})")
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.encoder = DialogEncoder(checkpoint, corpus_dirs, device, max_image_pixels)
        if self.encoder.embed_dim != dim:
            raise ValueError(f"QueryEncoder({checkpoint}): model embeds into {self.encoder.embed_dim} dims, "
                             f"the index holds {dim}-dim vectors")

    async def encode(self, request: RetrieveRequest) -> dict[str, Any]:
        return await self._encode_batch(request)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, requests: list[RetrieveRequest]) -> list[dict[str, Any]]:
        # The forward pass runs in a thread so the replica's event loop keeps collecting the next batch.
        return await asyncio.to_thread(self.encoder.encode, requests)
