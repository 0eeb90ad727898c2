"""FAISS index construction: kinds, defaults from measurement, validated parameters, CPU/GPU placement.

Every index uses inner product on L2-normalised vectors (= cosine). IVF kinds
are trained once on a sample of the whole corpus and the trained empty index is
cloned for every shard, so all shards share one coarse quantizer (what FAISS
itself does for sharded IVF). When ``faiss.get_num_gpus() > 0`` training,
adding and searching run on GPU 0 (``index_cpu_to_gpu``); written files are
always CPU indexes so any machine can load them. HNSW, re-ranked (``Refine``)
and ``index_factory`` indexes stay on the CPU: FAISS has no GPU HNSW and its
GPU cloner does not take ``IndexRefine``.

Defaults come from ``bench/results/ann_recall.json`` (``bench/ann_recall.py``,
1M x 512 model-shaped vectors in 4 shards of 250k, one shared quantizer of
nlist 2,048, 2 threads): IVF nprobe 10 reaches recall@10 0.976 at 13.3x flat
search (nprobe 8: 0.948). Hence:

- ``nlist`` (when not given) = ``default_nlist(n)``: the power of two at or below
  ``4 * sqrt(n)`` for the n training-corpus vectors (1M -> 2,048, the measured
  setting), halved until every list gets at least 39 training points (FAISS's
  k-means minimum per centroid; below it FAISS warns and the centroids are noise).
- ``nprobe`` (when not given) = ``min(10, nlist)``; requests may set 1..nlist
  (or ``max_nprobe``), recorded with the index as ``search_knobs``.
- IVFPQ re-ranks by exact inner product by default (``refine=True``: a
  ``,Refine(Flat)`` stage over ``k_factor * k`` PQ candidates): plain IVFPQ
  never passed recall@10 0.17 on model data (its 64-byte codes are too coarse).
- ``factory`` takes any FAISS ``index_factory`` string (``{nlist}`` is replaced
  by ``default_nlist(n)``), e.g. ``IVF{nlist},PQ32x8,Refine(Flat)``.

Query-time knobs are applied per search with ``faiss.SearchParametersIVF`` /
``SearchParametersHNSW`` (wrapped in ``IndexRefineSearchParameters`` for a
refined index), never by mutating the shared index, so concurrent requests
with different knobs cannot see each other's settings.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dialclip_ray.errors import format_validation_error

IndexKind = Literal["flat", "ivf", "ivfpq", "hnsw", "factory"]
KINDS: tuple[str, ...] = ("flat", "ivf", "ivfpq", "hnsw", "factory")
DEFAULT_NPROBE = 10  # ann_recall.json: recall@10 0.976 at 13.3x flat (nlist 2,048, 1M vectors)
MIN_POINTS_PER_LIST = 39  # FAISS k-means warns below 39 training points per centroid
DEFAULT_MAX_EF_SEARCH = 1024



def _ivf_of(index):
    """The IVF layer inside ``index`` (through refine/pre-transform wrappers), or None.

    ``faiss.try_extract_index_ivf`` is missing from some builds (the GPU kit's stand-in), so use
    ``extract_index_ivf``, which raises where there is none (the stand-in: NotImplementedError).
    """
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError, TypeError, NotImplementedError):
        return None

def default_nlist(n: int) -> int:
    """Coarse centroids for ``n`` training vectors: the power of two <= 4*sqrt(n), at least 39 points per list.

    The benchmark's measured setting (1M vectors -> 2,048) is what this returns; FAISS's own guideline
    is 4..16*sqrt(n), and the low end keeps the quantizer cheap next to the lists it selects."""
    if n < 1:
        raise ValueError(f"default_nlist needs at least one vector, got n={n}")
    nlist = 1 << max(0, int(math.floor(math.log2(4 * math.sqrt(n)))))
    while nlist > 1 and n // nlist < MIN_POINTS_PER_LIST:
        nlist //= 2
    return nlist


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FlatParams(_Params):
    pass


class IVFParams(_Params):
    nlist: int | None = Field(None, ge=1, description="coarse centroids (default: default_nlist(corpus size))")
    nprobe: int | None = Field(None, ge=1, description=f"lists visited per query (default: min({DEFAULT_NPROBE}, "
                                                       f"nlist))")
    max_nprobe: int | None = Field(None, ge=1, description="largest nprobe a request may ask (default: nlist)")
    max_train_points: int = Field(256, ge=39, description="training sample per centroid")

    @model_validator(mode="after")
    def _check(self):
        if self.nlist is not None:
            for name in ("nprobe", "max_nprobe"):
                if getattr(self, name) is not None and getattr(self, name) > self.nlist:
                    raise ValueError(f"{name}={getattr(self, name)} exceeds nlist={self.nlist}")
        if self.nprobe is not None and self.max_nprobe is not None and self.nprobe > self.max_nprobe:
            raise ValueError(f"nprobe={self.nprobe} exceeds max_nprobe={self.max_nprobe}")
        return self


class IVFPQParams(IVFParams):
    m: int = Field(32, ge=1, description="PQ sub-quantizers (must divide dim)")
    nbits: int = Field(8, ge=1, le=16)
    refine: bool = Field(True, description="re-rank PQ candidates by exact inner product (Refine(Flat))")
    k_factor: int = Field(4, ge=1, description="PQ candidates re-ranked per hit wanted (refine only)")


class HNSWParams(_Params):
    M: int = Field(32, ge=2, le=256)
    ef_construction: int = Field(80, ge=1)
    ef_search: int = Field(64, ge=1)
    max_ef_search: int = Field(DEFAULT_MAX_EF_SEARCH, ge=1, description="largest efSearch a request may ask")

    @model_validator(mode="after")
    def _check(self):
        if self.ef_search > self.max_ef_search:
            raise ValueError(f"ef_search={self.ef_search} exceeds max_ef_search={self.max_ef_search}")
        return self


class FactoryParams(_Params):
    factory: str = Field(min_length=1, max_length=200, description="FAISS index_factory string ({nlist} allowed)")
    nprobe: int | None = Field(None, ge=1, description="default nprobe when the string has an IVF stage")
    max_nprobe: int | None = Field(None, ge=1)
    ef_search: int | None = Field(None, ge=1, description="default efSearch when the string has an HNSW stage")
    max_ef_search: int = Field(DEFAULT_MAX_EF_SEARCH, ge=1)
    k_factor: int | None = Field(None, ge=1, description="re-ranking factor when the string ends in Refine(...)")
    max_train_points: int = Field(256, ge=39, description="training sample per IVF centroid")


PARAM_MODELS: dict[str, type[_Params]] = {"flat": FlatParams, "ivf": IVFParams, "ivfpq": IVFPQParams,
                                          "hnsw": HNSWParams, "factory": FactoryParams}


class KnobBounds(_Params):
    """A query-time knob of a built index: its default and the range a request may ask."""

    default: int = Field(ge=1)
    min: int = Field(1, ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _order(self):
        if not self.min <= self.default <= self.max:
            raise ValueError(f"need min <= default <= max, got {self.min}, {self.default}, {self.max}")
        return self


def validate_params(kind: str, params: dict[str, Any] | None) -> _Params:
    """Typed parameters for ``kind``; unknown kinds or keys raise ``ValueError`` naming them."""
    if kind not in PARAM_MODELS:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")
    try:
        return PARAM_MODELS[kind].model_validate(params or {})
    except ValidationError as err:
        raise ValueError(format_validation_error(err, f"invalid params for index kind {kind!r}")) from None


def resolve_params(kind: str, params: dict[str, Any] | None, n: int) -> dict[str, Any]:
    """``params`` with the corpus-size defaults filled in (what the manifest records): nlist, nprobe, the
    factory string's ``{nlist}``. Raises ``ValueError`` when ``n`` vectors cannot train the index."""
    p = validate_params(kind, params)
    out = p.model_dump(exclude_none=True)
    if kind in ("ivf", "ivfpq"):
        nlist = p.nlist or default_nlist(n)
        if n < nlist:
            raise ValueError(f"{kind}: {n} vectors cannot train nlist={nlist} centroids; lower nlist")
        out["nlist"] = nlist
        out["nprobe"] = p.nprobe or min(DEFAULT_NPROBE, nlist, p.max_nprobe or nlist)
    elif kind == "factory" and "{nlist}" in p.factory:
        out["factory"] = p.factory.replace("{nlist}", str(default_nlist(n)))
    validate_params(kind, out)
    return out


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


def gpu_capable(index: faiss.Index) -> bool:
    """Whether FAISS's GPU cloner takes this index (flat, IVF-Flat, IVFPQ; not HNSW nor IndexRefine)."""
    return isinstance(faiss.downcast_index(index), (faiss.IndexFlat, faiss.IndexIVFFlat, faiss.IndexIVFPQ))


def to_gpu(index: faiss.Index, kind: str) -> faiss.Index:
    """GPU copy of a CPU index (returned unchanged when FAISS has no GPU version of it)."""
    if not gpu_capable(index):
        return index
    opts = faiss.GpuClonerOptions()
    opts.useFloat16 = kind == "ivfpq"  # float16 lookup tables lift the GPU IVFPQ limit on code size
    return faiss.index_cpu_to_gpu(_gpu_resources(), 0, index, opts)


def _factory_string(kind: str, p: _Params, dim: int) -> str:
    if kind == "ivf":
        return f"IVF{p.nlist},Flat"
    if kind == "ivfpq":
        if dim % p.m:
            raise ValueError(f"ivfpq: m={p.m} must divide dim={dim}")
        return f"IVF{p.nlist},PQ{p.m}x{p.nbits}" + (",Refine(Flat)" if p.refine else "")
    return p.factory


def make_index(kind: str, dim: int, params: dict[str, Any] | None = None) -> faiss.Index:
    """An empty (untrained) CPU index with inner-product metric; IVF kinds need a resolved ``nlist``
    (``resolve_params``), or get ``default_nlist`` of a 1M corpus."""
    p = validate_params(kind, params)
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, p.M, ip)
        index.hnsw.efConstruction = p.ef_construction
        index.hnsw.efSearch = p.ef_search
        return index
    if kind in ("ivf", "ivfpq") and p.nlist is None:
        p = p.model_copy(update={"nlist": default_nlist(1_000_000)})
    spec = _factory_string(kind, p, dim)
    try:
        index = faiss.index_factory(dim, spec, ip)
    except RuntimeError as err:
        raise ValueError(f"{kind}: FAISS cannot build index_factory string {spec!r} for dim {dim} "
                         f"({str(err).strip().splitlines()[-1]})") from None
    ivf = _ivf_of(index)
    if ivf is not None:
        inner = faiss.downcast_index(ivf)
        if isinstance(inner, faiss.IndexIVFPQ):
            inner.do_polysemous_training = False  # only for Hamming-filtered search, never used; costs minutes
    refine = _refine(index)
    if refine is not None and getattr(p, "k_factor", None):
        refine.k_factor = float(p.k_factor)
    return index


def _refine(index: faiss.Index):
    """The ``IndexRefine`` of a re-ranked index, else None."""
    index = faiss.downcast_index(index)
    return index if isinstance(index, faiss.IndexRefine) else None


def _hnsw(index: faiss.Index):
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        index = faiss.downcast_index(index.base_index)
    return index if isinstance(index, faiss.IndexHNSW) else None


def train_template(kind: str, dim: int, params: dict[str, Any] | None, vectors: np.ndarray,
                   use_gpu: bool | None = None, seed: int = 0) -> faiss.Index:
    """A trained, empty CPU index; clone it per shard with ``faiss.clone_index``."""
    n = vectors.shape[0]
    resolved = resolve_params(kind, params, n)
    p = validate_params(kind, resolved)
    index = make_index(kind, dim, resolved)
    if index.is_trained:
        return index
    if kind == "ivfpq" and n < 2**p.nbits:
        raise ValueError(f"ivfpq: {n} vectors cannot train 2**nbits={2**p.nbits} PQ centroids; lower nbits")
    ivf = _ivf_of(index)
    if ivf is not None and n < ivf.nlist:
        raise ValueError(f"{kind}: {n} vectors cannot train nlist={ivf.nlist} centroids; lower nlist")
    cap = p.max_train_points * (ivf.nlist if ivf is not None else 256)
    if kind == "ivfpq":
        cap = max(cap, 39 * 2**p.nbits)  # FAISS's minimum for the PQ codebooks' k-means
    sample = vectors
    if n > cap:
        rows = np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))
        sample = vectors[rows]
    if resolve_use_gpu(use_gpu) and gpu_capable(index):
        gpu = to_gpu(index, kind)
        gpu.train(np.ascontiguousarray(sample))
        return faiss.index_gpu_to_cpu(gpu)
    index.train(np.ascontiguousarray(sample))
    return index


def add_vectors(template: faiss.Index, kind: str, vectors: np.ndarray, use_gpu: bool | None = None,
                batch: int = 65536) -> faiss.Index:
    """A CPU index = clone of ``template`` filled with ``vectors`` (added on the GPU when available)."""
    index = faiss.clone_index(template)
    on_gpu = resolve_use_gpu(use_gpu) and gpu_capable(index)
    work = to_gpu(index, kind) if on_gpu else index
    for s in range(0, vectors.shape[0], batch):
        work.add(np.ascontiguousarray(vectors[s : s + batch]))
    return faiss.index_gpu_to_cpu(work) if on_gpu else work


def search_knobs(index: faiss.Index, params: dict[str, Any]) -> dict[str, KnobBounds]:
    """The query-time knobs a built index offers (``nprobe`` for an IVF stage, ``ef_search`` for HNSW),
    each with its default (the resolved params) and the bounds a request may ask."""
    knobs: dict[str, KnobBounds] = {}
    ivf = _ivf_of(index)
    if ivf is not None:
        top = params.get("max_nprobe") or ivf.nlist
        knobs["nprobe"] = KnobBounds(default=min(params.get("nprobe") or DEFAULT_NPROBE, ivf.nlist, top),
                                     max=min(top, ivf.nlist))
    hnsw = _hnsw(index)
    if hnsw is not None:
        top = params.get("max_ef_search", DEFAULT_MAX_EF_SEARCH)
        knobs["ef_search"] = KnobBounds(default=min(params.get("ef_search") or hnsw.hnsw.efSearch, top), max=top)
    return knobs


def check_knobs(knobs: dict[str, int] | None, bounds: dict[str, KnobBounds], where: str) -> dict[str, int]:
    """Requested knobs within ``bounds``; ``ValueError`` naming the knob and its allowed range otherwise."""
    for name, value in (knobs or {}).items():
        if name not in bounds:
            offered = ", ".join(bounds) or "none"
            raise ValueError(f"{name}: {where} has no {name} knob (its knobs: {offered})")
        b = bounds[name]
        if not b.min <= value <= b.max:
            raise ValueError(f"{name}: {value} is outside {where}'s bounds {b.min}..{b.max} (default {b.default})")
    return dict(knobs or {})


def search_parameters(index: faiss.Index, knobs: dict[str, int] | None):
    """``(params, keepalive)`` for ``index.search(..., params=params)``; ``(None, None)`` without knobs.

    ``keepalive`` holds the inner SWIG objects a refine wrapper points to (they must outlive the search)."""
    if not knobs:
        return None, None
    base = None
    if "nprobe" in knobs:
        base = faiss.SearchParametersIVF(nprobe=int(knobs["nprobe"]))
    elif "ef_search" in knobs:
        base = faiss.SearchParametersHNSW(efSearch=int(knobs["ef_search"]))
    refine = _refine(index) if not _is_gpu(index) else None
    if refine is not None and base is not None:
        return faiss.IndexRefineSearchParameters(k_factor=float(refine.k_factor), base_index_params=base), base
    return base, base


def set_search_params(index: faiss.Index, kind: str, params: dict[str, Any] | None) -> None:
    """Apply the default query-time knobs stored with the index (at load, before any search)."""
    params = params or {}
    if _is_gpu(index):
        if "nprobe" in params and kind in ("ivf", "ivfpq"):
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(params["nprobe"]))
        return
    ivf = _ivf_of(index)
    if ivf is not None and params.get("nprobe"):
        ivf.nprobe = int(params["nprobe"])
    hnsw = _hnsw(index)
    if hnsw is not None and params.get("ef_search"):
        hnsw.hnsw.efSearch = int(params["ef_search"])


def _is_gpu(index: faiss.Index) -> bool:
    return type(index).__name__.startswith("Gpu")
