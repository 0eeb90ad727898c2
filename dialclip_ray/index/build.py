"""The index build job: embed prepared corpora with a checkpoint (Ray Data) and write a serving index.

Every image and text id of the corpora is embedded by an actor pool of encoders
(``evaluation.distributed``) and written with ``layout.write_index``. The pool's size
and GPUs per actor are requested (``--actors``, ``--gpus-per-actor``). The checkpoint
and the output may be object-store URIs: the index is built in a local directory and
uploaded when complete (``index.json`` last, so a reader never takes a partial one),
and ``index.json`` names the checkpoint by its URI, so any node can serve it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dialclip_ray.data.schema import read_meta

from dialclip_ray.index.layout import TARGETS, IndexLayout, checkpoint_identity, write_index


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
                batch_size: int, gpus_per_actor: float = 0.0) -> np.ndarray:
    """Vectors for ``items`` in order, each corpus's ids embedded by a Ray Data encoder pool."""
    from dialclip_ray.evaluation.distributed import embed_with_ray

    out: np.ndarray | None = None
    owner = np.asarray(items.owner)
    for c, directory in enumerate(corpus_dirs):
        rows = np.flatnonzero(owner == c)
        if not len(rows):
            continue
        vecs = embed_with_ray(checkpoint, str(directory), target, [items.ids[r] for r in rows], None, actors,
                              batch_size, gpus_per_actor)
        if out is None:
            out = np.zeros((len(items.ids), vecs.shape[1]), np.float32)
        out[rows] = vecs
    assert out is not None
    return out


def build_index(checkpoint: str | os.PathLike, corpus_dirs: Sequence[str | os.PathLike], out: str | os.PathLike,
                shards: int = 1, kind: str = "flat", params: dict[str, Any] | None = None, actors: int = 2,
                target_types: Sequence[str] = TARGETS, batch_size: int = 64, overwrite: bool = False,
                use_gpu: bool | None = None, gpus_per_actor: float = 0.0, versioned: bool = False,
                activate: bool | None = None) -> IndexLayout:
    """Embed every image/text of ``corpus_dirs`` with ``checkpoint`` and write ``OUT/{image,text}/``.

    Starts (or joins) Ray itself (``runtime.ensure_ray``). A modality with fewer items than
    ``shards`` gets one shard per item; a modality absent from every corpus is skipped.
    ``versioned``: ``out`` is a version root (``layout``): a new ``out/<index_id>/`` beside the served
    one, made CURRENT when ``activate`` (default: only the root's first index).
    """
    from tqdm.auto import tqdm

    from dialclip_ray import storage
    from dialclip_ray.index import validate_params
    from dialclip_ray.runtime import ensure_ray

    out = storage.normalize(out)
    checkpoint = str(storage.normalize(checkpoint))
    dirs = [Path(d).resolve() for d in corpus_dirs]
    if not dirs:
        raise ValueError("build_index needs at least one --corpus directory")
    bad = [t for t in target_types if t not in TARGETS]
    if bad or not target_types:
        raise ValueError(f"target_types must be a non-empty subset of {TARGETS}, got {list(target_types)}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    validate_params(kind, params)
    if versioned and storage.is_uri(out):
        raise ValueError(f"{out}: versioned index roots are local or shared-filesystem paths (CURRENT is switched "
                         f"by an atomic rename); build into a mounted path, or unversioned into the bucket")
    if storage.exists(out) and not overwrite and not versioned:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    identity = checkpoint_identity(storage.local_dir(checkpoint))
    corpora = []
    for d in dirs:
        meta = read_meta(d)
        corpora.append({"dir": str(d), "source": meta.get("source", ""), "image_root": meta.get("image_root")})
    ensure_ray(num_cpus=actors)
    modalities = {}
    for target in tqdm(list(target_types), desc="embedding modalities", disable=None):
        items = collect_items(dirs, target)
        if items.ids:
            vectors = embed_items(checkpoint, dirs, target, items, actors, batch_size, gpus_per_actor)
            metadata = pa.table({name: pa.array(values, pa.string()) for name, values in items.meta.items()})
            modalities[target] = (items.ids, vectors, metadata)
    if not modalities:
        raise ValueError(f"no {' or '.join(target_types)} items in {[str(d) for d in dirs]}")
    if not storage.is_uri(out):
        return write_index(out, modalities, identity, shards, kind, params, corpora, checkpoint, overwrite, use_gpu,
                           versioned=versioned, activate_new=activate)
    import tempfile

    local = Path(tempfile.mkdtemp(prefix="index-", dir=storage._mkdir(storage.cache_root()))) / storage.name_of(out)
    layout = write_index(local, modalities, identity, shards, kind, params, corpora, checkpoint, False, use_gpu)
    from dialclip_ray.index.layout import INFO_FILE

    info = (local / INFO_FILE).read_text()
    (local / INFO_FILE).unlink()
    if storage.exists(out):  # --overwrite: no file of the old index may survive beside the new one
        storage.delete_dir(out)
    storage.upload_dir(local, out)
    storage.write_text(storage.join(out, INFO_FILE), info)  # last: its presence = complete
    (local / INFO_FILE).write_text(info)
    return layout
