"""FAISS index construction: kinds, validated parameters, CPU/GPU placement.

Every index uses inner product on L2-normalised vectors (= cosine). IVF kinds
are trained once on a sample of the whole corpus and the trained empty index is
cloned for every shard, so all shards share one coarse quantizer (what FAISS
itself does for sharded IVF). When ``faiss.get_num_gpus() > 0`` training,
adding and searching run on GPU 0 (``index_cpu_to_gpu``); written files are
always CPU indexes so any machine can load them. HNSW has no FAISS GPU
implementation and always stays on the CPU.
"""

from __future__ import annotations

from typing import Any, Literal

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dialclip_ray.errors import format_validation_error

IndexKind = Literal["flat", "ivf", "ivfpq", "hnsw"]
KINDS: tuple[str, ...] = ("flat", "ivf", "ivfpq", "hnsw")


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FlatParams(_Params):
    pass


class IVFParams(_Params):
    nlist: int = Field(256, ge=1, description="coarse centroids")
    nprobe: int = Field(16, ge=1, description="lists visited per query")
    max_train_points: int = Field(256, ge=39, description="training sample per centroid")

    @model_validator(mode="after")
    def _check(self):
        if self.nprobe > self.nlist:
            raise ValueError(f"nprobe={self.nprobe} exceeds nlist={self.nlist}")
        return self


class IVFPQParams(IVFParams):
    m: int = Field(32, ge=1, description="PQ sub-quantizers (must divide dim)")
    nbits: int = Field(8, ge=1, le=16)


class HNSWParams(_Params):
    M: int = Field(32, ge=2, le=256)
    ef_construction: int = Field(80, ge=1)
    ef_search: int = Field(64, ge=1)


PARAM_MODELS: dict[str, type[_Params]] = {"flat": FlatParams, "ivf": IVFParams, "ivfpq": IVFPQParams, "hnsw": HNSWParams}


def validate_params(kind: str, params: dict[str, Any] | None) -> _Params:
    """Typed parameters for ``kind``; unknown kinds or keys raise ``ValueError`` naming them."""
    if kind not in PARAM_MODELS:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")
    try:
        return PARAM_MODELS[kind].model_validate(params or {})
    except ValidationError as err:
        raise ValueError(format_validation_error(err, f"invalid params for index kind {kind!r}")) from None


def gpu_available() -> bool:
    return faiss.get_num_gpus() > 0


def resolve_use_gpu(use_gpu: bool | None) -> bool:
    """``None`` = use the GPU when FAISS sees one; ``True`` without a GPU is an error."""
    if use_gpu is None:
        return gpu_available()
    if use_gpu and not gpu_available():
        raise RuntimeError("use_gpu=True but faiss.get_num_gpus() == 0")
    return bool(use_gpu)


_GPU_RES = None


def _gpu_resources():
    # One StandardGpuResources per process: it owns cuBLAS handles and scratch memory, and
    # the SWIG index does not keep it alive on its own.
    global _GPU_RES
    if _GPU_RES is None:
        _GPU_RES = faiss.StandardGpuResources()
    return _GPU_RES


def to_gpu(index: faiss.Index, kind: str) -> faiss.Index:
    """GPU copy of a CPU index (HNSW is returned unchanged: no GPU version)."""
    if kind == "hnsw":
        return index
    opts = faiss.GpuClonerOptions()
    opts.useFloat16 = kind == "ivfpq"  # float16 lookup tables lift the GPU IVFPQ limit on code size
    return faiss.index_cpu_to_gpu(_gpu_resources(), 0, index, opts)


def make_index(kind: str, dim: int, params: dict[str, Any] | None = None) -> faiss.Index:
    """An empty (untrained) CPU index with inner-product metric."""
    p = validate_params(kind, params)
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, p.M, ip)
        index.hnsw.efConstruction = p.ef_construction
        index.hnsw.efSearch = p.ef_search
        return index
    if kind == "ivf":
        return faiss.index_factory(dim, f"IVF{p.nlist},Flat", ip)
    if dim % p.m:
        raise ValueError(f"ivfpq: m={p.m} must divide dim={dim}")
    index = faiss.index_factory(dim, f"IVF{p.nlist},PQ{p.m}x{p.nbits}", ip)
    index.do_polysemous_training = False  # only for Hamming-filtered search, which we never use; costs minutes
    return index


def train_template(kind: str, dim: int, params: dict[str, Any] | None, vectors: np.ndarray,
                   use_gpu: bool | None = None, seed: int = 0) -> faiss.Index:
    """A trained, empty CPU index; clone it per shard with ``faiss.clone_index``."""
    p = validate_params(kind, params)
    index = make_index(kind, dim, params)
    if index.is_trained:
        return index
    n = vectors.shape[0]
    if n < p.nlist:
        raise ValueError(f"{kind}: {n} vectors cannot train nlist={p.nlist} centroids; lower nlist")
    if kind == "ivfpq" and n < 2**p.nbits:
        raise ValueError(f"ivfpq: {n} vectors cannot train 2**nbits={2**p.nbits} PQ centroids; lower nbits")
    cap = p.max_train_points * p.nlist
    if kind == "ivfpq":
        cap = max(cap, 39 * 2**p.nbits)  # FAISS's minimum for the PQ codebooks' k-means
    sample = vectors
    if n > cap:
        rows = np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))
        sample = vectors[rows]
    if resolve_use_gpu(use_gpu):
        gpu = to_gpu(index, kind)
        gpu.train(np.ascontiguousarray(sample))
        return faiss.index_gpu_to_cpu(gpu)
    index.train(np.ascontiguousarray(sample))
    return index


def add_vectors(template: faiss.Index, kind: str, vectors: np.ndarray, use_gpu: bool | None = None,
                batch: int = 65536) -> faiss.Index:
    """A CPU index = clone of ``template`` filled with ``vectors`` (added on the GPU when available)."""
    index = faiss.clone_index(template)
    on_gpu = resolve_use_gpu(use_gpu) and kind != "hnsw"
    work = to_gpu(index, kind) if on_gpu else index
    for s in range(0, vectors.shape[0], batch):
        work.add(np.ascontiguousarray(vectors[s : s + batch]))
    return faiss.index_gpu_to_cpu(work) if on_gpu else work


def set_search_params(index: faiss.Index, kind: str, params: dict[str, Any] | None) -> None:
    """Apply the query-time knobs (nprobe, efSearch) stored with the index."""
    p = validate_params(kind, params)
    gpu = faiss.GpuParameterSpace() if _is_gpu(index) else None
    if kind in ("ivf", "ivfpq"):
        if gpu is not None:
            gpu.set_index_parameter(index, "nprobe", p.nprobe)
        else:
            faiss.extract_index_ivf(index).nprobe = p.nprobe
    elif kind == "hnsw":
        index.hnsw.efSearch = p.ef_search


def _is_gpu(index: faiss.Index) -> bool:
    return type(index).__name__.startswith("Gpu")
