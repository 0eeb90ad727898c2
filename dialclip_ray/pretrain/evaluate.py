"""Held-out caption<->image retrieval recall of a CLIP (all candidates, chunked).

Ranks and recall come from ``dialclip_ray.evaluation.metrics`` (the PhotoChat
all-candidates protocol, ties counted against the target), so these numbers are
in percent like every other reported metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from dialclip_ray.evaluation.metrics import DEFAULT_KS, ranks_all_candidates, recall_at_k
from dialclip_ray.pretrain.data import CaptionDataset, CaptionRow
from dialclip_ray.pretrain.encode import encode_text_trimmed


def paired_ranks(queries: torch.Tensor, candidates: torch.Tensor) -> np.ndarray:
    """1-based rank of candidate i for query i among all candidates (ties count against)."""
    q = queries.detach().float().cpu().numpy()
    return ranks_all_candidates(q, candidates.detach().float().cpu().numpy(), np.arange(len(q)))


@torch.no_grad()
def embed_pairs(model: torch.nn.Module, root: Path, pairs: list[CaptionRow], transform: Callable[[Any], torch.Tensor],
                tokenizer, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised (image, caption) embeddings, one row per pair."""
    model.eval()
    ds = CaptionDataset(root, pairs, transform, tokenizer, cache_images=False)
    images, texts = [], []
    for start in tqdm(range(0, len(ds), batch_size), desc="embed held-out", mininterval=5, leave=False):
        idx = range(start, min(start + batch_size, len(ds)))
        images.append(model.encode_image(torch.stack([ds.image(i) for i in idx]), normalize=True).float())
        texts.append(encode_text_trimmed(model, ds.tokens[start:idx.stop], normalize=True).float())
    return torch.cat(images), torch.cat(texts)


def caption_retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor,
                              ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """``caption_to_image_R@k`` / ``image_to_caption_R@k`` (percent), ``pool_size``, ``chance_R@1`` (percent)."""
    t2i = paired_ranks(text_emb, image_emb)
    i2t = paired_ranks(image_emb, text_emb)
    out = {f"caption_to_image_R@{k}": recall_at_k(t2i, k) for k in ks}
    out.update({f"image_to_caption_R@{k}": recall_at_k(i2t, k) for k in ks})
    out["pool_size"] = len(image_emb)
    out["chance_R@1"] = 100.0 / max(1, len(image_emb))
    return out
