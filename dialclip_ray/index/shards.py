"""Sharded FAISS index on disk: build, per-shard search, top-k merge.

Layout of an index directory::

    manifest.json            written last: its presence means the index is complete
    shard-00000.faiss        FAISS index of the shard's vectors (local rows 0..count-1)
    shard-00000.ids.parquet  row i -> string id (+ optional metadata columns)

Vectors get *global labels* ``offset + local row``; shards return global labels
so the merge needs no id maps, and string ids travel with each shard's answer
(the Serve ingress holds no index data at all).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from dialclip_ray.fsio import atomic_write, staging_dir
from dialclip_ray.index.factory import (add_vectors, check_knobs, resolve_params, resolve_use_gpu, search_knobs,
                                        search_parameters, set_search_params, to_gpu, train_template)
from dialclip_ray.index.manifest import IndexManifest, IndexManifestError, ShardEntry


@dataclass
class ShardHits:
    """Top-k answer for a batch of queries: scores/labels [Q, k]; ids [Q, k] object (None where label == -1)."""

    scores: np.ndarray
    labels: np.ndarray
    ids: np.ndarray


def _validate_inputs(ids: Sequence[str], vectors: np.ndarray, shards: int, metadata: pa.Table | None) -> np.ndarray:
    x = np.asarray(vectors)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"vectors must be a non-empty [N, D] array, got shape {x.shape}")
    if len(ids) != x.shape[0]:
        raise ValueError(f"{len(ids)} ids for {x.shape[0]} vectors")
    seen: set[str] = set()
    for i, v in enumerate(ids):
        if not isinstance(v, str) or not v:
            raise ValueError(f"ids[{i}] must be a non-empty string, got {v!r}")
        if v in seen:
            raise ValueError(f"ids[{i}]: duplicate id {v!r}")
        seen.add(v)
    if not 1 <= shards <= x.shape[0]:
        raise ValueError(f"shards={shards} must be between 1 and the number of vectors ({x.shape[0]})")
    if metadata is not None:
        if metadata.num_rows != x.shape[0]:
            raise ValueError(f"metadata has {metadata.num_rows} rows for {x.shape[0]} vectors")
        if "id" in metadata.column_names and metadata.column("id").to_pylist() != list(ids):
            raise ValueError("metadata column 'id' disagrees with ids")
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"vector of id {ids[i]!r} (row {i}) has non-finite values")
    norms = np.linalg.norm(x, axis=1)
    if (norms == 0).any():
        i = int(np.flatnonzero(norms == 0)[0])
        raise ValueError(f"vector of id {ids[i]!r} (row {i}) is all zeros and cannot be L2-normalised")
    faiss.normalize_L2(x)
    return x


def _write_shard(tmp_dir: Path, entry: ShardEntry, index: faiss.Index, id_table: pa.Table) -> None:
    """Both files are written atomically (no half-written file under the final name)."""
    atomic_write(tmp_dir / entry.index_file, lambda p: faiss.write_index(index, str(p)))
    atomic_write(tmp_dir / entry.id_map_file, lambda p: pq.write_table(id_table, p))


def build_sharded_index(
    ids: Sequence[str],
    vectors: np.ndarray,
    out_dir: str | os.PathLike,
    shards: int = 1,
    kind: str = "flat",
    params: dict[str, Any] | None = None,
    identity: dict[str, Any] | None = None,
    metadata: pa.Table | None = None,
    use_gpu: bool | None = None,
    overwrite: bool = False,
    index_id: str | None = None,
) -> IndexManifest:
    """L2-normalise, split into ``shards`` contiguous shards, write FAISS files + id maps + manifest.

    The whole directory is built under a hidden temp name next to ``out_dir`` and renamed
    into place at the end, so a failure leaves no ``out_dir`` (and no temp dir) behind.
    With ``overwrite=True`` an existing index is swapped out only after the new one is complete.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True to replace it)")
    x = _validate_inputs(ids, vectors, shards, metadata)
    n, dim = x.shape
    params = resolve_params(kind, params, n)  # corpus-size defaults, recorded in the manifest
    with staging_dir(out) as tmp:
        template = train_template(kind, dim, params, x, use_gpu=use_gpu)
        bounds = [i * n // shards for i in range(shards + 1)]
        entries = []
        for s in tqdm(range(shards), desc=f"index shards ({kind})", disable=None):
            lo, hi = bounds[s], bounds[s + 1]
            entry = ShardEntry(index_file=f"shard-{s:05d}.faiss", id_map_file=f"shard-{s:05d}.ids.parquet",
                               count=hi - lo, offset=lo)
            index = add_vectors(template, kind, x[lo:hi], use_gpu=use_gpu)
            table = pa.table({"id": pa.array(list(ids[lo:hi]), pa.string())})
            if metadata is not None:
                for name in metadata.column_names:
                    if name != "id":
                        table = table.append_column(name, metadata.column(name).slice(lo, hi - lo))
            _write_shard(tmp, entry, index, table)
            entries.append(entry)
            del index
        manifest = IndexManifest(dim=dim, kind=kind, params=params, shards=entries, total_count=n,
                                 identity=dict(identity or {}), search=search_knobs(template, params),
                                 index_id=index_id)
        manifest.save(tmp)  # last file written inside the temp dir
    return manifest


class ShardSearcher:
    """One shard loaded in memory (what a Serve shard replica holds)."""

    def __init__(self, index_dir: str | os.PathLike, shard: int, manifest: IndexManifest | None = None,
                 use_gpu: bool | None = None, search_params: dict[str, Any] | None = None):
        self.index_dir = Path(index_dir)
        self.manifest = manifest or IndexManifest.load(self.index_dir)
        if not 0 <= shard < len(self.manifest.shards):
            raise IndexError(f"{self.index_dir}: shard {shard} out of range (index has {len(self.manifest.shards)})")
        self.shard = shard
        entry = self.manifest.shards[shard]
        self.offset, self.count = entry.offset, entry.count
        path = self.index_dir / entry.index_file
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as err:
            raise IndexManifestError(f"{path}: cannot read FAISS index ({str(err).splitlines()[0]})") from None
        if index.ntotal != entry.count or index.d != self.manifest.dim:
            raise IndexManifestError(f"{path}: has {index.ntotal} vectors of dim {index.d}, manifest says "
                                     f"{entry.count} of dim {self.manifest.dim}")
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise IndexManifestError(f"{path}: metric is not inner product")
        map_path = self.index_dir / entry.id_map_file
        self.table = pq.read_table(map_path)
        if "id" not in self.table.column_names or self.table.num_rows != entry.count:
            raise IndexManifestError(f"{map_path}: expected an 'id' column with {entry.count} rows")
        self.ids = np.asarray(self.table.column("id").to_pylist() + [None], dtype=object)  # [-1] -> None
        kind = self.manifest.kind
        # Bounds the manifest records (older manifests: derived from the index itself).
        self.knobs = self.manifest.search or search_knobs(index, self.manifest.params)
        self.index = to_gpu(index, kind) if resolve_use_gpu(use_gpu) else index
        set_search_params(self.index, kind, {**self.manifest.params, **(search_params or {})})

    def search(self, queries: np.ndarray, k: int, normalize: bool = True,
               knobs: dict[str, int] | None = None) -> ShardHits:
        """Top-``k`` by inner product; labels are global (``offset + row``), -1 where fewer than k exist.

        ``knobs`` (``nprobe``, ``ef_search``) apply to this search only, within the recorded bounds."""
        q = _check_queries(queries, self.manifest.dim, normalize)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        check_knobs(knobs, self.knobs, f"the {self.manifest.kind} index")
        params, _keepalive = search_parameters(self.index, knobs)
        scores, local = self.index.search(q, k, params=params) if params is not None else self.index.search(q, k)
        labels = np.where(local >= 0, local + self.offset, -1)
        return ShardHits(scores=scores, labels=labels, ids=self.ids[local])

    def metadata(self, labels: Sequence[int]) -> list[dict[str, Any]]:
        """Id-map rows (id + metadata columns) for global labels of this shard."""
        rows = [int(lbl) - self.offset for lbl in labels]
        for lbl, r in zip(labels, rows):
            if not 0 <= r < self.count:
                raise IndexError(f"label {lbl} is not in shard {self.shard}")
        return self.table.take(pa.array(rows, pa.int64())).to_pylist()


def _check_queries(queries: np.ndarray, dim: int, normalize: bool) -> np.ndarray:
    q = np.array(queries, dtype=np.float32, order="C", copy=True, ndmin=2)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must have shape [Q, {dim}], got {np.shape(queries)}")
    if not np.isfinite(q).all():
        raise ValueError("queries contain non-finite values")
    if normalize:
        faiss.normalize_L2(q)
    return q


def merge_topk(per_shard: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (scores, global labels) into the overall top-``k`` with FAISS's ``ResultHeap``.

    ``keep_max=True`` because larger inner products are better; shard answers may have
    different widths and need not be sorted. Output is sorted by descending score.
    """
    if not per_shard:
        raise ValueError("merge_topk needs at least one shard result")
    nq = per_shard[0][0].shape[0]
    heap = faiss.ResultHeap(nq, k, keep_max=True)
    for i, (d, lab) in enumerate(per_shard):
        if d.shape != lab.shape or d.shape[0] != nq:
            raise ValueError(f"shard result {i}: scores {d.shape} / labels {lab.shape} do not match {nq} queries")
        heap.add_result(d, lab)
    heap.finalize()
    return heap.D, heap.I


def merge_hits(hits: Sequence[ShardHits], k: int) -> ShardHits:
    """``merge_topk`` plus the string ids carried by each shard's answer."""
    scores, labels = merge_topk([(h.scores, h.labels) for h in hits], k)
    lookup: dict[int, Any] = {-1: None}
    for h in hits:
        lookup.update(zip(h.labels.ravel().tolist(), h.ids.ravel().tolist()))
    ids = np.array([lookup[int(v)] for v in labels.ravel()], dtype=object).reshape(labels.shape)
    return ShardHits(scores=scores, labels=labels, ids=ids)


class ShardedIndex:
    """All shards in one process (evaluation, benchmarks); same merge path as the Serve ingress."""

    def __init__(self, index_dir: str | os.PathLike, use_gpu: bool | None = None,
                 search_params: dict[str, Any] | None = None):
        self.manifest = IndexManifest.load(index_dir)
        self.searchers = [ShardSearcher(index_dir, s, self.manifest, use_gpu, search_params)
                          for s in range(len(self.manifest.shards))]

    def __len__(self) -> int:
        return self.manifest.total_count

    def search(self, queries: np.ndarray, k: int, normalize: bool = True,
               knobs: dict[str, int] | None = None) -> ShardHits:
        return merge_hits([s.search(queries, k, normalize, knobs) for s in self.searchers], k)
