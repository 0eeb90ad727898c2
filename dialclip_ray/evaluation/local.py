"""Retrieval evaluation of a model on a prepared dataset split, in one process.

Two protocols, chosen per example: examples with their own candidate list
(MMDialog valid/test: target + 999 negatives) are ranked against it; the others
(PhotoChat) against every candidate of their modality in the split. Metrics are
reported per retrieval type. This is the reference the distributed evaluation
(``evaluation_ray``) must reproduce, and what training uses for validation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from dialclip_ray.model.batch import RETRIEVAL_TYPES, TARGET_TYPES
from dialclip_ray.data.dataset import CanonicalDataset, ExampleRecord, ReaderConfig, build_query_batch, image_loader
from dialclip_ray.evaluation.metrics import grouped_metrics, ranks_all_candidates, ranks_per_example
from dialclip_ray.model.text import tokenize_texts

if TYPE_CHECKING:
    from dialclip_ray.features.store import FeatureStore


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
def embed_queries(model, records: Sequence[ExampleRecord], tokenizer: Any, load_image: Callable,
                  reader: ReaderConfig, batch_size: int = 64, device: str | torch.device = "cpu",
                  features: FeatureStore | None = None) -> np.ndarray:
    batches = (build_query_batch(chunk, tokenizer, load_image, reader, features)
               for chunk in _batches(list(records), batch_size))
    out = [model.encode_query(q.to(device)).float().cpu() for q in batches]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


@torch.no_grad()
def embed_images(model, image_ids: Sequence[str], load_image: Callable, batch_size: int = 64,
                 device: str | torch.device = "cpu") -> np.ndarray:
    out = [model.encode_images(torch.stack([load_image(i) for i in chunk]).to(device)).float().cpu()
           for chunk in _batches(list(image_ids), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


@torch.no_grad()
def embed_texts(model, texts: Sequence[str], tokenizer: Any, context_length: int = 77, batch_size: int = 256,
                device: str | torch.device = "cpu") -> np.ndarray:
    out = [model.encode_texts(tokenize_texts(tokenizer, chunk, context_length).to(device)).float().cpu()
           for chunk in _batches(list(texts), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def candidate_pool(dataset: CanonicalDataset, records: Sequence[ExampleRecord], split: str,
                   target_type: str) -> list[str]:
    """Ids to embed: the union of per-example lists, or the split's whole pool (PhotoChat protocol)."""
    if records and all(r.candidates for r in records):
        return sorted({c for r in records for c in r.candidates})
    return dataset.image_ids(split) if target_type == "image" else dataset.text_ids(split)


def ranks_for(queries: np.ndarray, records: Sequence[ExampleRecord], pool_ids: Sequence[str],
              pool: np.ndarray) -> np.ndarray:
    row = {cid: i for i, cid in enumerate(pool_ids)}
    if records and all(r.candidates for r in records):
        return ranks_per_example(queries, [r.candidates for r in records], [r.target_id for r in records], row, pool)
    missing = [r.target_id for r in records if r.target_id not in row]
    if missing:
        raise ValueError(f"targets missing from the candidate pool: {missing[:3]}")
    return ranks_all_candidates(queries, pool, [row[r.target_id] for r in records])


def summarise(per_type: dict[str, dict[str, float]]) -> dict:
    """Per-type metrics plus ``sum``: the mean of each type's Sum (the validation score to maximise)."""
    sums = [m["Sum"] for m in per_type.values()]
    return {"per_type": per_type, "sum": float(np.mean(sums)) if sums else 0.0}


def evaluate_model(model, backbone, dataset: CanonicalDataset, split: str, reader: ReaderConfig | None = None,
                   batch_size: int = 64, device: str | torch.device = "cpu",
                   max_examples: int | None = None, features: FeatureStore | None = None) -> dict:
    """Metrics of ``model`` on one split (every target type present), single process.

    ``features``: the dataset's frozen feature store (the same numbers, without running the
    frozen towers over every context turn and image).
    """
    reader = reader or ReaderConfig.from_model_config(model.cfg)
    load = image_loader(dataset, backbone.preprocess_val)
    was_training = model.training
    model.eval()
    per_type = {}
    try:
        for target_type in TARGET_TYPES:
            records = dataset.examples(split, target_type)[:max_examples]
            if not records:
                continue
            queries = embed_queries(model, records, backbone.tokenizer, load, reader, batch_size, device,
                                    features)
            pool_ids = candidate_pool(dataset, records, split, target_type)
            pool = (embed_images(model, pool_ids, load, batch_size, device) if target_type == "image" else
                    embed_texts(model, [dataset.text(t) for t in pool_ids], backbone.tokenizer,
                                reader.context_length, batch_size, device))
            ranks = ranks_for(queries, records, pool_ids, pool)
            name = RETRIEVAL_TYPES[TARGET_TYPES.index(target_type)]
            per_type.update(grouped_metrics(ranks, [name] * len(ranks)))
    finally:
        model.train(was_training)
    return summarise(per_type)
