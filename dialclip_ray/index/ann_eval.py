"""How much recall an approximate index keeps, on data shaped like ours, and what it buys in speed.

Three kinds of vectors, all unit-norm: ``uniform`` (random directions: the worst case for every ANN
index, and unlike any embedding), ``clustered`` (random centres plus noise) and ``model`` (the
cluster structure of our model's own embeddings: k-means centres of real DialCLIP embeddings and
each cluster's spread, placed in the target dimension by a random orthonormal map, so neighbourhoods
look like the real ones at any size). ``sweep`` builds an index of one kind in shards exactly as
``index build`` does (one trained template, cloned per shard, results merged with FAISS's heap)
and measures recall@10 against exact search and queries/s for each value of the search knob;
``default_of`` picks the serving default (or says where the sweep misses it) and ``merge_results``
folds a remeasurement of some (data, index) pairs into an existing results file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import faiss
import numpy as np

from dialclip_ray.index.factory import add_vectors, set_search_params, train_template
from dialclip_ray.index.shards import merge_topk


def uniform(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    faiss.normalize_L2(x)
    return x


def clustered(n: int, dim: int, clusters: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """Unit vectors: 80 % around ``clusters`` random centres, 20 % unclustered (the hard queries)."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(1234).standard_normal((clusters, dim), dtype=np.float32)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        noise = rng.standard_normal((m, dim), dtype=np.float32)
        member = (rng.random(m) < 0.8)[:, None]
        out[s : s + m] = np.where(member, centers[rng.integers(0, clusters, m)] + noise, 3.0 * noise)
    faiss.normalize_L2(out)
    return out


@dataclass
class FittedMixture:
    """Cluster centres and per-cluster, per-direction spread of real embeddings (in their own dimension)."""
    centers: np.ndarray  # [C, d]
    scales: np.ndarray  # [C, d] residual standard deviation per cluster and coordinate
    weights: np.ndarray  # [C] cluster shares

    @classmethod
    def fit(cls, embeddings: np.ndarray, clusters: int = 256, seed: int = 0) -> "FittedMixture":
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        faiss.normalize_L2(x)
        clusters = min(clusters, max(1, x.shape[0] // 40))
        km = faiss.Kmeans(x.shape[1], clusters, niter=20, seed=seed, spherical=True, verbose=False)
        km.train(x)
        _, assign = km.index.search(x, 1)
        assign = assign.ravel()
        scales = np.zeros_like(km.centroids)
        weights = np.bincount(assign, minlength=clusters).astype(np.float64)
        for c in range(clusters):
            members = x[assign == c]
            scales[c] = members.std(axis=0) if len(members) > 1 else x.std(axis=0)
        return cls(km.centroids.copy(), scales, weights / weights.sum())

    def sample(self, n: int, dim: int, seed: int, chunk: int = 100_000) -> np.ndarray:
        """``n`` unit vectors in ``dim`` dimensions with this mixture's geometry (``dim`` >= its own)."""
        d = self.centers.shape[1]
        if dim < d:
            raise ValueError(f"cannot place {d}-dim structure in {dim} dimensions")
        basis, _ = np.linalg.qr(np.random.default_rng(4321).standard_normal((dim, d)))  # orthonormal columns
        basis = basis.astype(np.float32).T  # [d, dim]
        rng = np.random.default_rng(seed)
        out = np.empty((n, dim), np.float32)
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            c = rng.choice(len(self.weights), m, p=self.weights)
            local = self.centers[c] + self.scales[c] * rng.standard_normal((m, d), dtype=np.float32)
            out[s : s + m] = local @ basis
        faiss.normalize_L2(out)
        return out


def exact_topk(x: np.ndarray, q: np.ndarray, k: int = 10) -> tuple[np.ndarray, float]:
    """Ground truth labels and exact (flat) search speed in queries/s."""
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    t = time.perf_counter()
    _, labels = flat.search(q, k)
    return labels, len(q) / (time.perf_counter() - t)


def recall_at(labels: np.ndarray, gt: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(labels, gt)]))


def build_shards(kind: str, params: dict, x: np.ndarray, shards: int) -> tuple[list, list[int], float]:
    """One trained template, cloned and filled per shard (as ``index build`` does); build seconds."""
    t = time.perf_counter()
    template = train_template(kind, x.shape[1], params, x)
    bounds = np.linspace(0, len(x), shards + 1).astype(int)
    indexes = [add_vectors(template, kind, x[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return indexes, [int(a) for a in bounds[:-1]], time.perf_counter() - t


def sharded_search(indexes: list, offsets: list[int], q: np.ndarray, k: int) -> np.ndarray:
    results = []
    for index, offset in zip(indexes, offsets):
        d, lab = index.search(q, k)
        results.append((d, np.where(lab >= 0, lab + offset, -1)))
    return merge_topk(results, k)[1]


def sweep(kind: str, params: dict, knob: str, values: list[int], indexes: list, offsets: list[int],
          q: np.ndarray, gt: np.ndarray, k: int = 10) -> list[dict]:
    """recall@k and queries/s of the sharded index for each value of ``knob`` (nprobe, ef_search)."""
    rows = []
    for v in values:
        for index in indexes:
            set_search_params(index, kind, {**params, knob: v})
        t = time.perf_counter()
        labels = sharded_search(indexes, offsets, q, k)
        qps = len(q) / (time.perf_counter() - t)
        rows.append({"param": f"{knob}={v}", "recall_at_10": round(recall_at(labels, gt, k), 4), "qps": round(qps, 1)})
    return rows


def pick_default(rows: list[dict], flat_qps: float, recall: float = 0.95, speedup: float = 10.0) -> dict | None:
    """The fastest setting with recall >= ``recall`` and at least ``speedup`` x flat's queries/s, if any."""
    ok = [r for r in rows if r["recall_at_10"] >= recall and r["qps"] >= speedup * flat_qps]
    return max(ok, key=lambda r: r["qps"]) if ok else None


def why_no_default(rows: list[dict], flat_qps: float, recall: float = 0.95, speedup: float = 10.0) -> str:
    """Where the sweep misses the target: the best recall at the speed-up, the best speed-up at the recall."""
    fast = [r for r in rows if r["qps"] >= speedup * flat_qps]
    good = [r for r in rows if r["recall_at_10"] >= recall]
    parts = [f"at >= {speedup:g}x flat the best recall@10 is "
             + (f"{max(r['recall_at_10'] for r in fast):.3f}" if fast else "- (no setting that fast)")]
    if good:
        top = max(good, key=lambda r: r["qps"])
        parts.append(f"recall@10 >= {recall} first at {top['param']}, {top['qps'] / flat_qps:.1f}x flat")
    else:
        parts.append(f"no setting reaches recall@10 {recall} (best {max(r['recall_at_10'] for r in rows):.3f})")
    return "; ".join(parts)


def default_of(rows: list[dict], data: str, index: str) -> dict:
    """The fastest setting with recall@10 >= 0.95 at >= 10x flat for one (data, index), or where it misses."""
    found = [r for r in rows if r["data"] == data and r["index"] == index]
    flat_qps = found[0]["flat_qps"]
    best = pick_default(found, flat_qps)
    return {"data": data, "index": index, "default": best["param"] if best else None,
            "note": "recall@10 >= 0.95 at >= 10x flat" if best else why_no_default(found, flat_qps)}


def merge_results(old: dict, new: dict) -> dict:
    """``old`` with the (data, index) pairs that ``new`` measured replaced; each run keeps its command."""
    done = {(r["data"], r["index"]) for r in new["rows"]}
    keep = lambda items: [r for r in items if (r["data"], r["index"]) not in done]  # noqa: E731
    order = {pair: i for i, pair in enumerate(dict.fromkeys((r["data"], r["index"]) for r in old["rows"]))}
    runs = old.get("runs") or [{k: old[k] for k in ("command", "threads", "total_s") if k in old}]
    return {**old, "notes": {**old.get("notes", {}), **new["notes"]},
            "runs": runs + [{"command": new["command"], "threads": new["threads"], "total_s": new["total_s"],
                             "measured": sorted(f"{d}/{i}" for d, i in done)}],
            "rows": sorted(keep(old["rows"]) + new["rows"], key=lambda r: order.get((r["data"], r["index"]), 99))}
