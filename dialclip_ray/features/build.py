"""Building the frozen feature store with Ray Data: every distinct context turn and image, embedded once.

Rows ``{"kind": "turn"|"image", "value": text or image id}`` go through an actor
pool of frozen-backbone encoders (each loads the backbone once and checks its
weights hash against the driver's, so every vector comes from the same weights);
the driver gathers the vectors and writes the store atomically. Only context
turns and context images are embedded: candidates are encoded by the *prompted*
towers, whose output changes during training.

The pool's size and each actor's GPUs are asked for (``actors``, ``gpus_per_actor``;
``dialclip features build --actors/--gpus-per-actor``, ``data.feature_actors`` /
``data.feature_gpus_per_actor`` in a training config), never inferred from what the cluster
holds at that moment: an autoscaled cluster starts without GPU nodes, and only a request for
GPUs makes the autoscaler add one.
"""

from __future__ import annotations

import time
import os
from pathlib import Path
from typing import Any

import numpy as np

from dialclip_ray.data.dataset import CanonicalDataset
from dialclip_ray.data.schema import SPLITS
from dialclip_ray.features.store import (FEATURE_MODES, FeatureMode, FeatureStoreError, check_store,
                                         dataset_fingerprint, needs_store, store_dir, text_key, write_store)


class FrozenEncoder:
    """Ray Data UDF: frozen CLIP text/image embeddings in float32, plus each image's content key."""

    def __init__(self, model_name: str, pretrained: str | None, weights_hash: str, dataset_dir: str,
                 threads: int = 1, cache_dir: str | None = None):
        import torch

        from dialclip_ray.data.dataset import image_loader
        from dialclip_ray.model.backbone import load_backbone
        from dialclip_ray.model.backbone import weights_hash as hash_of

        torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.backbone = load_backbone(model_name, pretrained, cache_dir=cache_dir)
        got = hash_of(self.backbone.model)
        if got != weights_hash:
            raise FeatureStoreError(f"encoder actor loaded {model_name} weights {got}, driver expected "
                                    f"{weights_hash}: the pretrained file changed during the build")
        self.clip = self.backbone.model.to(self.device).eval()
        self.dataset = CanonicalDataset.load(dataset_dir)
        self.load_image = image_loader(self.dataset, self.backbone.preprocess_val, cache_size=0)

    def _texts(self, texts: list[str]) -> np.ndarray:
        import torch

        from dialclip_ray.model.text import tokenize_texts

        tokens = tokenize_texts(self.backbone.tokenizer, texts, self.backbone.context_length).to(self.device)
        with torch.no_grad():
            return self.clip.encode_text(tokens).float().cpu().numpy()

    def _images(self, image_ids: list[str]) -> tuple[np.ndarray, list[bytes]]:
        import torch

        from dialclip_ray.features.store import file_key

        pixels = torch.stack([self.load_image(i) for i in image_ids]).to(self.device)
        with torch.no_grad():
            feats = self.clip.encode_image(pixels).float().cpu().numpy()
        return feats, [file_key(self.dataset.image_path(i)) for i in image_ids]

    def __call__(self, batch: dict) -> dict:
        kinds = [str(k) for k in batch["kind"]]
        values = [str(v) for v in batch["value"]]
        feats: list[Any] = [None] * len(values)
        keys: list[bytes] = [b""] * len(values)
        turn_rows = [i for i, k in enumerate(kinds) if k == "turn"]
        image_rows = [i for i, k in enumerate(kinds) if k == "image"]
        if turn_rows:
            for i, f in zip(turn_rows, self._texts([values[i] for i in turn_rows])):
                feats[i], keys[i] = f, text_key(values[i])
        if image_rows:
            f_img, k_img = self._images([values[i] for i in image_rows])
            for i, f, k in zip(image_rows, f_img, k_img):
                feats[i], keys[i] = f, k
        return {"kind": np.asarray(kinds, dtype=object), "value": np.asarray(values, dtype=object),
                "key": np.asarray(keys, dtype=object), "feature": np.stack(feats).astype(np.float32)}


def context_items(dataset: CanonicalDataset) -> tuple[list[str], list[str]]:
    """Distinct context turn texts and context image ids over every split, in first-seen order."""
    texts: dict[str, None] = {}
    images: dict[str, None] = {}
    for split in dataset.splits():
        for record in dataset.examples(split):
            for turn in record.context:
                texts.setdefault(turn.text)
                for image_id in turn.image_ids:
                    if dataset.has_image(image_id):
                        images.setdefault(image_id)
    return list(texts), list(images)


def _embed(items: list[dict], model_name: str, pretrained: str | None, weights_hash: str, dataset_dir: str,
           actors: int, batch_size: int, gpus_per_actor: float = 0.0,
           cache_dir: str | None = None) -> dict[str, tuple[list, list, list]]:
    import ray.data

    from dialclip_ray.runtime import actor_pool

    ds = ray.data.from_items(items).map_batches(
        FrozenEncoder, fn_constructor_kwargs=dict(model_name=model_name, pretrained=pretrained,
                                                  weights_hash=weights_hash, dataset_dir=dataset_dir,
                                                  cache_dir=cache_dir),
        batch_size=batch_size, **actor_pool(actors, gpus_per_actor))
    out: dict[str, tuple[list, list, list]] = {"turn": ([], [], []), "image": ([], [], [])}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for kind, value, key, feat in zip(batch["kind"], batch["value"], batch["key"], batch["feature"]):
            values, keys, feats = out[str(kind)]
            values.append(str(value))
            keys.append(bytes(key))
            feats.append(feat)
    return out


def locate_store(dataset_dir: str | Path, model_name: str, pretrained: str | None,
                 cache_dir: str | None = None) -> tuple[Path, str]:
    """(store directory, weights hash) for a backbone: loads it once to hash its weights."""
    from dialclip_ray.model.backbone import load_backbone, weights_hash

    whash = weights_hash(load_backbone(model_name, pretrained, cache_dir=cache_dir).model)
    return store_dir(Path(dataset_dir).resolve(), model_name, whash), whash


def build_feature_store(dataset_dir: str | Path, model_name: str, pretrained: str | None = None,
                        out: str | Path | None = None, actors: int = 2, batch_size: int = 256,
                        force: bool = False, gpus_per_actor: float = 0.0, cache_dir: str | None = None) -> Path:
    """Embed the dataset's context turns and images with the frozen backbone; return the store directory.

    Reuses a complete, matching store unless ``force``. Starts (or joins) Ray itself. The pool is
    ``actors`` actors of ``gpus_per_actor`` GPUs each (0: CPU actors).
    """
    from dialclip_ray.model.backbone import load_backbone, weights_hash
    from dialclip_ray.runtime import ensure_ray

    dataset_dir = Path(dataset_dir).resolve()
    if pretrained and Path(pretrained).expanduser().exists():
        pretrained = str(Path(pretrained).expanduser().resolve())
    backbone = load_backbone(model_name, pretrained, cache_dir=cache_dir)
    whash = weights_hash(backbone.model)
    out = Path(out) if out else store_dir(dataset_dir, model_name, whash)
    if not force:
        try:
            check_store(out, whash, dataset_dir)
            return out
        except FeatureStoreError:
            pass
    dataset = CanonicalDataset.load(dataset_dir)
    texts, image_ids = context_items(dataset)
    items = [{"kind": "turn", "value": t} for t in texts] + [{"kind": "image", "value": i} for i in image_ids]
    dim = int(backbone.model.text_projection.shape[-1])
    t0 = time.time()
    found = {"turn": ([], [], []), "image": ([], [], [])}
    if items:
        ensure_ray(num_cpus=actors)
        found = _embed(items, model_name, pretrained, whash, str(dataset_dir), actors, batch_size, gpus_per_actor,
                       cache_dir)

    def stack(feats: list) -> np.ndarray:
        return np.stack(feats).astype(np.float32) if feats else np.zeros((0, dim), np.float32)

    _, turn_keys, turn_feats = found["turn"]
    image_values, image_keys, image_feats = found["image"]
    info = {"backbone": {"model_name": model_name, "pretrained": pretrained, "weights_hash": whash},
            "dataset": str(dataset_dir.name), "dataset_fingerprint": dataset_fingerprint(dataset_dir),
            "splits": [s for s in SPLITS if s in dataset.splits()], "build_seconds": round(time.time() - t0, 2),
            "dim": dim}
    return write_store(out, info, turn_keys, stack(turn_feats), image_keys, image_values, stack(image_feats))


def ensure_store(dataset_dir: str | os.PathLike, model_cfg: Any, mode: FeatureMode = "auto",
                 actors: int = 2, gpus_per_actor: float = 0.0) -> Path | None:
    """Driver side: make sure the store exists for ``model_cfg``'s backbone (build it in ``auto`` mode)."""
    if mode not in FEATURE_MODES:
        raise ValueError(f"features mode must be one of {FEATURE_MODES}, got {mode!r}")
    if mode == "off" or not needs_store(model_cfg):
        return None
    backbone = model_cfg.backbone
    if mode == "require":
        path, whash = locate_store(dataset_dir, backbone.model_name, backbone.pretrained, backbone.cache_dir)
        check_store(path, whash, dataset_dir)
        return path
    return build_feature_store(dataset_dir, backbone.model_name, backbone.pretrained, actors=actors,
                               gpus_per_actor=gpus_per_actor, cache_dir=backbone.cache_dir)
