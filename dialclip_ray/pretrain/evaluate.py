"""Held-out caption<->image retrieval recall of a CLIP (all candidates, chunked)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from dialclip_ray.pretrain.data import CaptionDataset, CaptionRow
from dialclip_ray.pretrain.encode import encode_text_trimmed


def recall_at_k(queries: torch.Tensor, candidates: torch.Tensor, ks=(1, 5, 10), chunk: int = 1024) -> dict[int, float]:
    """Query i's target is candidate i; recall@k in percent. Ties count against the target."""
    hits = {k: 0 for k in ks}
    for start in range(0, len(queries), chunk):
        sims = queries[start:start + chunk] @ candidates.T
        idx = torch.arange(start, start + len(sims))
        target = sims[torch.arange(len(sims)), idx].unsqueeze(1)
        rank = (sims >= target).sum(dim=1) - 1  # 0 = target ranked first
        for k in ks:
            hits[k] += int((rank < k).sum())
    return {k: 100.0 * hits[k] / max(1, len(queries)) for k in ks}


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


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict[str, float]:
    t2i = recall_at_k(text_emb, image_emb)
    i2t = recall_at_k(image_emb, text_emb)
    out = {f"caption_to_image_R@{k}": v for k, v in t2i.items()}
    out.update({f"image_to_caption_R@{k}": v for k, v in i2t.items()})
    out["pool_size"] = len(image_emb)
    out["chance_R@1"] = 100.0 / max(1, len(image_emb))
    return out
