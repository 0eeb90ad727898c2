"""Distributed evaluation: Ray Data ``map_batches`` over an actor pool of encoders.

Each actor loads the checkpoint once (frozen backbone + trainable state) and
embeds batches of queries, images or texts; the driver gathers the vectors and
ranks them with exactly the code of the single-process evaluation, so both give
the same numbers (a test checks this). Actors take a fraction of a GPU where
one exists, so several share a card.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .batch import RETRIEVAL_TYPES, TARGET_TYPES
from .data.dataset import CanonicalDataset, ReaderConfig
from .evaluation import candidate_pool, ranks_for, summarise
from .metrics import grouped_metrics


class EncoderActor:
    """Ray Data UDF: ``{"key": [...]} -> {"key": [...], "embedding": [N, D]}`` for one kind of input."""

    def __init__(self, checkpoint: str, dataset_dir: str, kind: str, split: str | None = None,
                 threads: int = 1):
        import torch

        from .checkpoint import load_checkpoint
        from .data.dataset import image_loader

        torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.backbone, _ = load_checkpoint(checkpoint, device=self.device)
        self.model.eval()
        self.kind = kind
        self.dataset = CanonicalDataset.load(dataset_dir)
        self.reader = ReaderConfig.from_model_config(self.model.cfg)
        self.load_image = image_loader(self.dataset, self.backbone.preprocess_val)
        self.records = {r.id: r for r in self.dataset.examples(split)} if kind == "query" and split else {}

    def __call__(self, batch: dict) -> dict:
        from .evaluation import embed_images, embed_queries, embed_texts

        keys = [str(k) for k in batch["key"]]
        if self.kind == "query":
            emb = embed_queries(self.model, [self.records[k] for k in keys], self.backbone.tokenizer,
                                self.load_image, self.reader, len(keys), self.device)
        elif self.kind == "image":
            emb = embed_images(self.model, keys, self.load_image, len(keys), self.device)
        else:
            emb = embed_texts(self.model, [self.dataset.text(k) for k in keys], self.backbone.tokenizer,
                              self.reader.context_length, len(keys), self.device)
        return {"key": np.asarray(keys, dtype=object), "embedding": emb.astype(np.float32)}


def embed_with_ray(checkpoint: str, dataset_dir: str, kind: str, keys: list[str], split: str | None = None,
                   actors: int = 2, batch_size: int = 64, gpu_fraction: float | None = None) -> np.ndarray:
    """Embeddings of ``keys`` (in order) computed by a pool of ``actors`` encoder actors."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    if not keys:
        return np.zeros((0, 0), np.float32)
    if gpu_fraction is None:
        gpu_fraction = 1.0 / actors if ray.cluster_resources().get("GPU", 0) else 0.0
    ds = ray.data.from_items([{"key": k} for k in keys])
    out = ds.map_batches(
        EncoderActor, fn_constructor_kwargs=dict(checkpoint=str(checkpoint), dataset_dir=str(dataset_dir),
                                                 kind=kind, split=split),
        compute=ActorPoolStrategy(size=actors), batch_size=batch_size,
        num_cpus=0.5 if not gpu_fraction else 0.25, num_gpus=gpu_fraction or None)
    rows = {}
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        for k, e in zip(batch["key"], batch["embedding"]):
            rows[str(k)] = e
    return np.stack([rows[k] for k in keys])


def evaluate_with_ray(checkpoint: str | Path, dataset_dir: str | Path, split: str, actors: int = 2,
                      batch_size: int = 64, max_examples: int | None = None) -> dict:
    """The metrics of ``evaluation.evaluate_model``, with the embedding done by Ray Data actors."""
    checkpoint, dataset_dir = str(Path(checkpoint).resolve()), str(Path(dataset_dir).resolve())
    dataset = CanonicalDataset.load(dataset_dir)
    per_type = {}
    for target_type in TARGET_TYPES:
        records = dataset.examples(split, target_type)[:max_examples]
        if not records:
            continue
        queries = embed_with_ray(checkpoint, dataset_dir, "query", [r.id for r in records], split, actors,
                                 batch_size)
        pool_ids = candidate_pool(dataset, records, split, target_type)
        pool = embed_with_ray(checkpoint, dataset_dir, target_type, pool_ids, None, actors, batch_size)
        ranks = ranks_for(queries, records, pool_ids, pool)
        name = RETRIEVAL_TYPES[TARGET_TYPES.index(target_type)]
        per_type.update(grouped_metrics(ranks, [name] * len(ranks)))
    return summarise(per_type)


def default_actors() -> int:
    return max(1, min(4, (os.cpu_count() or 2) // 1))
