"""The frozen feature store: CLIP embeddings of a dataset's context turns and images, computed once.

The backbone is frozen, so the context prompt generator's inputs (each context
turn's text embedding and each context image's embedding) never change during
training or evaluation. Computing them on every step is what made prompt tuning
slower than fine-tuning; the store computes them once per (dataset, backbone).

On disk, ``<dataset>/features/<model_name>-<weights_hash[:12]>/``::

    turns.parquet    key (16-byte sha256 of the turn text), feature (float32[E])
    images.parquet   key (16-byte sha256 of the image file), image_id, feature (float32[E])
    store.json       written last: backbone identity, dataset fingerprint, dim, counts

Features are always float32, whatever the training precision, so validation never
depends on what ran before. A store is refused for another backbone (its weights
hash differs), and is stale when the dataset was prepared again (its ``meta.json``
changed): training and evaluation then rebuild it or stop with a clear error,
never use wrong features. A key the store lacks is an error, not a silent recompute.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 1
STORE_FILE = "store.json"
TURNS_FILE = "turns.parquet"
IMAGES_FILE = "images.parquet"
KEY_BYTES = 16


class FeatureStoreError(ValueError):
    """A store that is missing, incomplete or stale for the dataset it is asked about."""


class FeatureStoreMismatchError(FeatureStoreError):
    """A store computed with another backbone than the one in use."""


def text_key(text: str) -> bytes:
    """Content hash of a turn's text: the same text has the same frozen embedding."""
    return hashlib.sha256(text.encode("utf-8")).digest()[:KEY_BYTES]


def bytes_key(data: bytes) -> bytes:
    """Content hash of an image file's bytes."""
    return hashlib.sha256(data).digest()[:KEY_BYTES]


def file_key(path: str | os.PathLike) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.digest()[:KEY_BYTES]


def dataset_fingerprint(dataset_dir: str | os.PathLike) -> str:
    """Changes whenever the dataset is prepared again (``meta.json`` holds its creation time and counts)."""
    meta = Path(dataset_dir) / "meta.json"
    return hashlib.sha256(meta.read_bytes()).hexdigest()[:16]


def store_dir(dataset_dir: str | os.PathLike, model_name: str, weights_hash: str) -> Path:
    safe = model_name.replace("/", "_").replace(":", "_")
    return Path(dataset_dir) / "features" / f"{safe}-{weights_hash[:12]}"


def _feature_table(keys: Sequence[bytes], features: np.ndarray, extra: dict[str, list] | None = None) -> pa.Table:
    features = np.ascontiguousarray(features, dtype=np.float32)
    if features.ndim != 2 or len(features) != len(keys):
        raise ValueError(f"features must be [N={len(keys)}, E], got {features.shape}")
    dim = features.shape[1]
    flat = pa.array(features.reshape(-1), pa.float32())
    cols = {"key": pa.array(list(keys), pa.binary(KEY_BYTES)),
            "feature": pa.FixedSizeListArray.from_arrays(flat, dim)}
    for name, values in (extra or {}).items():
        cols[name] = pa.array(values, pa.string())
    return pa.table(cols)


def _read_features(path: Path) -> tuple[pa.Table, np.ndarray]:
    table = pq.read_table(path)
    col = table.column("feature").combine_chunks()
    dim = col.type.list_size
    feats = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    return table, feats


@dataclass
class FeatureStore:
    """An opened store: lookups of turn features by text and image features by image id."""

    directory: Path
    info: dict[str, Any]
    turn_rows: dict[bytes, int]
    turn_features: np.ndarray
    image_rows: dict[str, int]
    image_features: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    @property
    def identity(self) -> dict[str, Any]:
        return self.info["backbone"]

    @classmethod
    def open(cls, directory: str | os.PathLike, weights_hash: str | None = None,
             dataset_dir: str | os.PathLike | None = None) -> "FeatureStore":
        """Load a store; refuse it for another backbone (``weights_hash``) or a re-prepared dataset."""
        directory = Path(directory)
        check_store(directory, weights_hash, dataset_dir)
        info = json.loads((directory / STORE_FILE).read_text())
        turns, turn_feats = _read_features(directory / TURNS_FILE)
        images, image_feats = _read_features(directory / IMAGES_FILE)
        turn_rows = {k: i for i, k in enumerate(turns.column("key").to_pylist())}
        image_rows = {k: i for i, k in enumerate(images.column("image_id").to_pylist())}
        return cls(directory, info, turn_rows, turn_feats, image_rows, image_feats)

    def turns(self, texts: Sequence[str]) -> np.ndarray:
        """[N, E] features of turn texts; a text the store lacks is an error naming the store."""
        rows = []
        for text in texts:
            row = self.turn_rows.get(text_key(text))
            if row is None:
                raise FeatureStoreError(f"{self.directory}: no feature for context turn {text[:60]!r}; the store "
                                        f"does not cover this data (rebuild: dialclip features build)")
            rows.append(row)
        return self.turn_features[rows] if rows else np.zeros((0, self.dim), np.float32)

    def images(self, image_ids: Sequence[str]) -> np.ndarray:
        rows = []
        for image_id in image_ids:
            row = self.image_rows.get(image_id)
            if row is None:
                raise FeatureStoreError(f"{self.directory}: no feature for context image {image_id!r}; the store "
                                        f"does not cover this data (rebuild: dialclip features build)")
            rows.append(row)
        return self.image_features[rows] if rows else np.zeros((0, self.dim), np.float32)


def check_store(directory: str | os.PathLike, weights_hash: str | None = None,
                dataset_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The store's info if it is complete, for this backbone and this preparation of the dataset."""
    directory = Path(directory)
    path = directory / STORE_FILE
    if not path.is_file():
        raise FeatureStoreError(f"{directory}: no feature store ({STORE_FILE} missing: never built, or the build "
                                f"did not finish); build it with `dialclip features build`")
    info = json.loads(path.read_text())
    if info.get("format_version") != FORMAT_VERSION:
        raise FeatureStoreError(f"{path}: format_version {info.get('format_version')!r} is not {FORMAT_VERSION}")
    have = info.get("backbone", {}).get("weights_hash")
    if weights_hash is not None and have != weights_hash:
        raise FeatureStoreMismatchError(
            f"{directory}: features were computed with backbone {info['backbone'].get('model_name')!r} weights "
            f"{have}, not the loaded weights {weights_hash}; rebuild the store for this backbone")
    if dataset_dir is not None and info.get("dataset_fingerprint") != dataset_fingerprint(dataset_dir):
        raise FeatureStoreError(f"{directory}: stale: {dataset_dir} was prepared again after the store was built; "
                                f"rebuild it (dialclip features build --force)")
    return info


def write_store(directory: str | os.PathLike, info: dict[str, Any], turn_keys: Sequence[bytes],
                turn_features: np.ndarray, image_keys: Sequence[bytes], image_ids: Sequence[str],
                image_features: np.ndarray) -> Path:
    """Write the three files into a staging directory and publish it: a killed build leaves no store."""
    from dialclip_ray.fsio import atomic_write_text, staging_dir

    dims = {a.shape[1] for a in (turn_features, image_features) if a.ndim == 2 and len(a)}
    if len(dims) > 1:
        raise ValueError(f"turn and image features differ in width: {sorted(dims)}")
    info = {"format_version": FORMAT_VERSION, **info, "dim": dims.pop() if dims else int(info.get("dim", 0)),
            "turns": len(turn_keys), "images": len(image_ids), "dtype": "float32"}
    with staging_dir(directory) as tmp:
        pq.write_table(_feature_table(turn_keys, turn_features), tmp / TURNS_FILE)
        pq.write_table(_feature_table(image_keys, image_features, {"image_id": list(image_ids)}),
                       tmp / IMAGES_FILE)
        atomic_write_text(tmp / STORE_FILE, json.dumps(info, indent=2))  # last: its presence = complete
    return Path(directory)


FeatureMode = str  # "auto" (build when missing or stale), "require" (error when missing), "off"
FEATURE_MODES = ("auto", "require", "off")


def needs_store(model_cfg: Any) -> bool:
    """Only a frozen backbone with a context prompt generator reads context features."""
    return model_cfg.variant == "dialclip" and model_cfg.context_prompt_length > 0


def open_for_model(dataset_dir: str | os.PathLike, model: Any, mode: FeatureMode = "auto") -> FeatureStore | None:
    """The store of ``dataset_dir`` for ``model``'s backbone, or None when the model needs none or mode is off.

    Workers call this after the driver ran ``ensure_store``; it never builds, so a missing store
    here is an error in every mode but ``off``.
    """
    if mode not in FEATURE_MODES:
        raise ValueError(f"features mode must be one of {FEATURE_MODES}, got {mode!r}")
    if mode == "off" or not needs_store(model.cfg):
        return None
    ident = model.identity
    return FeatureStore.open(store_dir(dataset_dir, ident["model_name"], ident["weights_hash"]),
                             ident["weights_hash"], dataset_dir)
