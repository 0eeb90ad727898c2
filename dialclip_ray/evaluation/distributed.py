"""Distributed evaluation: Ray Data ``map_batches`` over an actor pool of encoders.

Each actor loads the checkpoint once (frozen backbone + trainable state) and
embeds batches of queries, images or texts; the driver gathers the vectors and
ranks them with exactly the code of the single-process evaluation, so both give
the same numbers (a test checks this). The pool's size and GPUs per actor are
requested (``actors``, ``gpus_per_actor``; 0.5 lets two actors share a card), never
inferred from what the cluster holds. The checkpoint may be an object-store URI:
each actor reads it into its node's cache (``storage.local_dir``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dialclip_ray.model.batch import RETRIEVAL_TYPES, TARGET_TYPES
from dialclip_ray.data.dataset import CanonicalDataset, ReaderConfig
from dialclip_ray.evaluation.local import candidate_pool, ranks_for, summarise
from dialclip_ray.evaluation.metrics import grouped_metrics
from dialclip_ray.features.build import ensure_store
from dialclip_ray.features.store import open_for_model


class EncoderActor:
    """Ray Data UDF: rows ``{"kind", "key"}`` -> the same rows plus ``embedding``.

    ``kind`` is ``query`` (an example id), ``image`` (an image id) or ``text`` (a text id), so
    one actor pool embeds a split's queries and both candidate pools in a single pass.
    """

    def __init__(self, checkpoint: str, dataset_dir: str, split: str | None = None, threads: int = 1,
                 features: str = "off"):
        import torch

        from dialclip_ray.model.checkpoint import load_checkpoint
        from dialclip_ray.data.dataset import image_loader
        from dialclip_ray.storage import local_dir

        torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.backbone, _ = load_checkpoint(local_dir(checkpoint), device=self.device)
        self.model.eval()
        self.dataset = CanonicalDataset.load(dataset_dir)
        self.reader = ReaderConfig.from_model_config(self.model.cfg)
        self.load_image = image_loader(self.dataset, self.backbone.preprocess_val)
        self.records = {r.id: r for r in self.dataset.examples(split)} if split else {}
        self.features = open_for_model(dataset_dir, self.model, features) if split else None

    def _embed(self, kind: str, keys: list[str]) -> np.ndarray:
        from dialclip_ray.evaluation.local import embed_images, embed_queries, embed_texts

        if kind == "query":
            return embed_queries(self.model, [self.records[k] for k in keys], self.backbone.tokenizer,
                                 self.load_image, self.reader, len(keys), self.device, self.features)
        if kind == "image":
            return embed_images(self.model, keys, self.load_image, len(keys), self.device)
        return embed_texts(self.model, [self.dataset.text(k) for k in keys], self.backbone.tokenizer,
                           self.reader.context_length, len(keys), self.device)

    def __call__(self, batch: dict) -> dict:
        kinds = [str(k) for k in batch["kind"]]
        keys = [str(k) for k in batch["key"]]
        out: list[np.ndarray | None] = [None] * len(keys)
        for kind in dict.fromkeys(kinds):
            rows = [i for i, k in enumerate(kinds) if k == kind]
            for i, e in zip(rows, self._embed(kind, [keys[i] for i in rows])):
                out[i] = e
        return {"kind": np.asarray(kinds, dtype=object), "key": np.asarray(keys, dtype=object),
                "embedding": np.stack(out).astype(np.float32)}


def embed_many_with_ray(checkpoint: str, dataset_dir: str, items: list[tuple[str, str]], split: str | None = None,
                        actors: int = 2, batch_size: int = 64, gpus_per_actor: float = 0.0,
                        features: str = "off") -> dict[tuple[str, str], np.ndarray]:
    """Embeddings of ``(kind, key)`` items computed by a pool of ``actors`` encoder actors."""
    import ray.data

    from dialclip_ray.runtime import actor_pool

    if not items:
        return {}
    ds = ray.data.from_items([{"kind": kind, "key": key} for kind, key in items])
    out = ds.map_batches(
        EncoderActor, fn_constructor_kwargs=dict(checkpoint=str(checkpoint), dataset_dir=str(dataset_dir),
                                                 split=split, features=features),
        batch_size=batch_size, **actor_pool(actors, gpus_per_actor))
    found = {}
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        for kind, key, e in zip(batch["kind"], batch["key"], batch["embedding"]):
            found[(str(kind), str(key))] = e
    return found


def embed_with_ray(checkpoint: str, dataset_dir: str, kind: str, keys: list[str], split: str | None = None,
                   actors: int = 2, batch_size: int = 64, gpus_per_actor: float = 0.0) -> np.ndarray:
    """Embeddings of ``keys`` of one kind, in order."""
    if not keys:
        return np.zeros((0, 0), np.float32)
    found = embed_many_with_ray(checkpoint, dataset_dir, [(kind, k) for k in keys], split, actors, batch_size,
                                gpus_per_actor)
    return np.stack([found[(kind, k)] for k in keys])


def evaluate_with_ray(checkpoint: str | Path, dataset_dir: str | Path, split: str, actors: int = 2,
                      batch_size: int = 64, max_examples: int | None = None, features: str = "auto",
                      return_ranks: bool = False, gpus_per_actor: float = 0.0) -> dict:
    """The metrics of ``evaluation.evaluate_model``, with all embedding done in one Ray Data pass.

    ``features``: ``auto`` builds the dataset's frozen feature store when missing and reads
    context features from it; ``require`` insists on an existing one; ``off`` runs the towers.
    ``return_ranks`` adds ``ranks`` ({retrieval type: the rank of every query, data order}), which
    is what paired comparisons between models need.
    """
    from dialclip_ray.model.checkpoint import read_checkpoint
    from dialclip_ray.model.config import DialCLIPConfig
    from dialclip_ray.storage import local_dir, normalize

    checkpoint, dataset_dir = str(normalize(checkpoint)), str(Path(dataset_dir).resolve())
    ensure_store(dataset_dir, DialCLIPConfig.model_validate(read_checkpoint(local_dir(checkpoint))[0]["config"]),
                 features, actors, gpus_per_actor)
    dataset = CanonicalDataset.load(dataset_dir)
    plan = {}
    for target_type in TARGET_TYPES:
        records = dataset.examples(split, target_type)[:max_examples]
        if records:
            plan[target_type] = (records, candidate_pool(dataset, records, split, target_type))
    items = [("query", r.id) for records, _ in plan.values() for r in records]
    items += list(dict.fromkeys((t, c) for t, (_, pool) in plan.items() for c in pool))
    found = embed_many_with_ray(checkpoint, dataset_dir, items, split, actors, batch_size, gpus_per_actor,
                                features="off" if features == "off" else "require")
    per_type, all_ranks = {}, {}
    for target_type, (records, pool_ids) in plan.items():
        queries = np.stack([found[("query", r.id)] for r in records])
        pool = np.stack([found[(target_type, c)] for c in pool_ids])
        ranks = ranks_for(queries, records, pool_ids, pool)
        name = RETRIEVAL_TYPES[TARGET_TYPES.index(target_type)]
        per_type.update(grouped_metrics(ranks, [name] * len(ranks)))
        all_ranks[name] = [int(x) for x in ranks]
    out = summarise(per_type)
    if return_ranks:
        out["ranks"] = all_ranks
    return out
