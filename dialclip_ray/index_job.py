"""The index job: embed prepared corpora with a checkpoint (Ray Data) and write a serving index.

Layout of an index built here::

    OUT/index.json     written last: identity, corpora, per-modality counts/shards
    OUT/image/         a sharded FAISS index (``dialclip_ray.index``) of every image id
    OUT/text/          the same for every text id (absent when the corpora hold no text)

Both sub-indexes carry the same identity: the checkpoint's backbone identity plus
digests of the checkpoint file and the model config. Serving compares it with the
checkpoint it loads and refuses a mismatch: vectors from one checkpoint are
meaningless to another's query encoder. The whole directory is built under a hidden
temp name and renamed at the end, so a failed build leaves nothing at ``OUT``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import replace_dir
from .data.schema import read_meta
from .index.manifest import IndexManifest, atomic_write_text

INFO_FILE = "index.json"
FORMAT_VERSION = 1
TARGETS = ("image", "text")


class IndexMismatchError(ValueError):
    """An index built from other vectors than the checkpoint would produce."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_identity(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """Backbone identity + sha256 of ``dialclip.pt`` + sha256 of the model config (canonical JSON)."""
    from .checkpoint import WEIGHTS_FILE, read_checkpoint  # torch: only where a checkpoint is read

    path = Path(checkpoint)
    meta, _ = read_checkpoint(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    config = json.dumps(meta["config"], sort_keys=True, separators=(",", ":"))
    return {**meta["backbone"], "checkpoint_sha256": file_sha256(weights),
            "config_sha256": hashlib.sha256(config.encode()).hexdigest()}


def check_identity(checkpoint_ident: dict[str, Any], index_ident: dict[str, Any], where: str) -> None:
    """Raise ``IndexMismatchError`` unless backbone weights and checkpoint digest agree."""
    for key in ("weights_hash", "checkpoint_sha256"):
        if checkpoint_ident.get(key) != index_ident.get(key):
            raise IndexMismatchError(
                f"{where}: index was built with {key}={index_ident.get(key)!r} but the checkpoint has "
                f"{key}={checkpoint_ident.get(key)!r}; rebuild the index with this checkpoint "
                f"(dialclip index build) or serve the checkpoint it was built from")


@dataclass
class IndexLayout:
    """A built index directory: ``index.json`` plus the manifest of each modality present."""

    directory: Path
    info: dict[str, Any]
    manifests: dict[str, IndexManifest] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "IndexLayout":
        directory = Path(directory)
        path = directory / INFO_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no index info (not an index built by `dialclip index build`, "
                                    f"or the build did not finish)")
        info = json.loads(path.read_text(encoding="utf-8"))
        if info.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {info.get('format_version')!r} is not {FORMAT_VERSION}")
        manifests = {t: IndexManifest.load(directory / t) for t in info.get("modalities", {})}
        if not manifests:
            raise ValueError(f"{path}: index has no modality")
        for t, m in manifests.items():
            if m.identity != info["identity"]:
                raise IndexMismatchError(f"{directory / t}: manifest identity differs from {path}")
        return cls(directory, info, manifests)

    @property
    def identity(self) -> dict[str, Any]:
        return self.info["identity"]

    @property
    def num_shards(self) -> int:
        return max(len(m.shards) for m in self.manifests.values())

    @property
    def dim(self) -> int:
        dims = {m.dim for m in self.manifests.values()}
        if len(dims) != 1:
            raise ValueError(f"{self.directory}: modalities have different dims {sorted(dims)}")
        return dims.pop()


@dataclass
class _Items:
    ids: list[str] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)      # index into corpus_dirs
    meta: dict[str, list] = field(default_factory=dict)


def collect_items(corpus_dirs: Sequence[Path], target: str) -> _Items:
    """Every image (or text) id of the prepared dataset dirs, first occurrence wins."""
    items, seen = _Items(), set()
    for c, directory in enumerate(corpus_dirs):
        source = read_meta(directory).get("source", "")
        if target == "image":
            table = pq.read_table(directory / "images.parquet", columns=["image_id", "path"])
            ids, extra = table.column("image_id").to_pylist(), {"path": table.column("path").to_pylist()}
        else:
            table = pq.read_table(directory / "texts.parquet", columns=["text_id", "text"])
            ids, extra = table.column("text_id").to_pylist(), {"text": table.column("text").to_pylist()}
        for row, item in enumerate(ids):
            if item in seen:
                continue
            seen.add(item)
            items.ids.append(item)
            items.owner.append(c)
            for name, values in {**extra, "source": None}.items():
                items.meta.setdefault(name, []).append(source if values is None else values[row])
    return items


def embed_items(checkpoint: str, corpus_dirs: Sequence[Path], target: str, items: _Items, actors: int,
                batch_size: int) -> np.ndarray:
    """Vectors for ``items`` in order, each corpus's ids embedded by a Ray Data encoder pool."""
    from .evaluation_ray import embed_with_ray

    out: np.ndarray | None = None
    owner = np.asarray(items.owner)
    for c, directory in enumerate(corpus_dirs):
        rows = np.flatnonzero(owner == c)
        if not len(rows):
            continue
        vecs = embed_with_ray(checkpoint, str(directory), target, [items.ids[r] for r in rows], None, actors,
                              batch_size)
        if out is None:
            out = np.zeros((len(items.ids), vecs.shape[1]), np.float32)
        out[rows] = vecs
    assert out is not None
    return out


def build_index(checkpoint: str | os.PathLike, corpus_dirs: Sequence[str | os.PathLike], out: str | os.PathLike,
                shards: int = 1, kind: str = "flat", params: dict[str, Any] | None = None, actors: int = 2,
                target_types: Sequence[str] = TARGETS, batch_size: int = 64, overwrite: bool = False,
                use_gpu: bool | None = None) -> IndexLayout:
    """Embed every image/text of ``corpus_dirs`` with ``checkpoint`` and write ``OUT/{image,text}/``.

    Needs a running Ray (``ray_utils.ensure_ray``). A modality with fewer items than
    ``shards`` gets one shard per item; a modality absent from every corpus is skipped.
    """
    from tqdm.auto import tqdm

    from .index import validate_params

    out = Path(out).resolve()
    checkpoint = str(Path(checkpoint).resolve())
    dirs = [Path(d).resolve() for d in corpus_dirs]
    if not dirs:
        raise ValueError("build_index needs at least one --corpus directory")
    bad = [t for t in target_types if t not in TARGETS]
    if bad or not target_types:
        raise ValueError(f"target_types must be a non-empty subset of {TARGETS}, got {list(target_types)}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    validate_params(kind, params)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    identity = checkpoint_identity(checkpoint)
    corpora = []
    for d in dirs:
        meta = read_meta(d)
        corpora.append({"dir": str(d), "source": meta.get("source", ""), "image_root": meta.get("image_root")})
    modalities = {}
    for target in tqdm(list(target_types), desc="embedding modalities", disable=None):
        items = collect_items(dirs, target)
        if items.ids:
            vectors = embed_items(checkpoint, dirs, target, items, actors, batch_size)
            metadata = pa.table({name: pa.array(values, pa.string()) for name, values in items.meta.items()})
            modalities[target] = (items.ids, vectors, metadata)
    if not modalities:
        raise ValueError(f"no {' or '.join(target_types)} items in {[str(d) for d in dirs]}")
    return write_index(out, modalities, identity, shards, kind, params, corpora, checkpoint, overwrite, use_gpu)


def write_index(out: str | os.PathLike, modalities: dict[str, tuple[Sequence[str], np.ndarray, pa.Table | None]],
                identity: dict[str, Any], shards: int = 1, kind: str = "flat", params: dict[str, Any] | None = None,
                corpora: Sequence[dict] = (), checkpoint: str | None = None, overwrite: bool = False,
                use_gpu: bool | None = None) -> IndexLayout:
    """Write ``{target: (ids, vectors, metadata)}`` as sub-indexes plus ``index.json``, atomically.

    ``identity`` should be ``checkpoint_identity(checkpoint)`` of the checkpoint whose
    candidate encoders produced ``vectors`` (serving compares it with what it loads).
    """
    from .index import build_sharded_index

    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    bad = [t for t in modalities if t not in TARGETS]
    if bad or not modalities:
        raise ValueError(f"modalities must be a non-empty subset of {TARGETS}, got {list(modalities)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        summary = {}
        for target, (ids, vectors, metadata) in modalities.items():
            manifest = build_sharded_index(ids, vectors, tmp / target, shards=min(shards, len(ids)), kind=kind,
                                           params=params, identity=identity, metadata=metadata, use_gpu=use_gpu)
            summary[target] = {"count": manifest.total_count, "shards": len(manifest.shards), "dim": manifest.dim}
        info = {"format_version": FORMAT_VERSION, "identity": identity, "checkpoint": checkpoint,
                "corpora": list(corpora), "kind": kind, "params": dict(params or {}), "modalities": summary,
                "created": datetime.now(timezone.utc).isoformat()}
        atomic_write_text(tmp / INFO_FILE, json.dumps(info, indent=2))  # last: its presence = complete
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return IndexLayout.load(out)
