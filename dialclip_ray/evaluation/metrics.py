"""Retrieval metrics for the two evaluation protocols (PhotoChat: all test photos; MMDialog: 999 negatives + target).

Ties are counted *against* the model (pessimistic rank):

    rank = 1 + #{c : s_c > s_t} + #{c != t : s_c == s_t}

so a degenerate model that gives every candidate the same score gets rank N,
not rank 1 (NaN candidate scores also count against it). Without this, a collapsed encoder (all embeddings equal) would
report R@1 = 100 %. All reported numbers (R@k, Sum, MRR) are in percent.

Protocols:
- all-candidates (PhotoChat): every query is scored against one shared pool;
  computed in query chunks so the [Q, N] score matrix is never materialised.
- per-example pools (MMDialog): each query has its own candidate id list that
  contains the target; embeddings are looked up by id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)
# Score-matrix chunk budget (floats): 32M floats = 128 MB per chunk.
_CHUNK_FLOATS = 32 * 1024 * 1024


def rank_of_target(scores: np.ndarray, target_index: int) -> int:
    """1-based pessimistic rank of ``scores[target_index]`` among ``scores`` (ties count against)."""
    s = np.asarray(scores)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {s.shape}")
    if not 0 <= target_index < s.size:
        raise IndexError(f"target_index {target_index} out of range for {s.size} candidates")
    st = s[target_index]
    if np.isnan(st):
        raise ValueError(f"target score is NaN (target_index={target_index})")
    # ">=" counts the target itself once; 1 + (#>= - 1) == #>=. NaN candidates count against too.
    return int(np.count_nonzero((s >= st) | np.isnan(s)))


def _ranks_from_matrix(scores: np.ndarray, targets: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Vectorised pessimistic ranks for a [B, C] score block; ``valid`` masks padded candidates."""
    st = scores[np.arange(scores.shape[0]), targets][:, None]
    if np.isnan(st).any():
        raise ValueError("NaN target score in score matrix")
    ge = (scores >= st) | np.isnan(scores)
    if valid is not None:
        ge &= valid
    return ge.sum(axis=1).astype(np.int64)


def recall_at_k(ranks: Sequence[int] | np.ndarray, k: int) -> float:
    """Percent (0..100) of queries whose target rank is <= k."""
    r = _as_ranks(ranks)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return 100.0 * float(np.mean(r <= k)) if r.size else 0.0


def mrr(ranks: Sequence[int] | np.ndarray) -> float:
    """Mean reciprocal rank, in percent (0..100)."""
    r = _as_ranks(ranks)
    return 100.0 * float(np.mean(1.0 / r)) if r.size else 0.0


def retrieval_metrics(ranks: Sequence[int] | np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """``{"R@k": %, ..., "Sum": sum of the R@k, "MRR": %, "count": n}``."""
    r = _as_ranks(ranks)
    out: dict[str, float] = {f"R@{k}": recall_at_k(r, k) for k in ks}
    out["Sum"] = float(sum(out[f"R@{k}"] for k in ks))
    out["MRR"] = mrr(r)
    out["count"] = int(r.size)
    return out


def _as_ranks(ranks: Sequence[int] | np.ndarray) -> np.ndarray:
    r = np.asarray(ranks, dtype=np.int64).reshape(-1)
    if r.size and r.min() < 1:
        raise ValueError(f"ranks are 1-based; got minimum {int(r.min())}")
    return r


def ranks_all_candidates(
    queries: np.ndarray, pool: np.ndarray, targets: Sequence[int] | np.ndarray, chunk_floats: int = _CHUNK_FLOATS
) -> np.ndarray:
    """PhotoChat protocol: ranks of ``targets[i]`` for ``queries[i]`` against the shared ``pool``.

    queries [Q, D], pool [N, D] (already normalised if cosine is wanted), targets [Q] row indices.
    """
    q = np.asarray(queries, dtype=np.float32)
    p = np.asarray(pool, dtype=np.float32)
    t = np.asarray(targets, dtype=np.int64).reshape(-1)
    if q.ndim != 2 or p.ndim != 2 or q.shape[1] != p.shape[1]:
        raise ValueError(f"queries {q.shape} and pool {p.shape} must be [Q, D] and [N, D] with equal D")
    if t.shape[0] != q.shape[0]:
        raise ValueError(f"{t.shape[0]} targets for {q.shape[0]} queries")
    if t.size and (t.min() < 0 or t.max() >= p.shape[0]):
        bad = int(np.flatnonzero((t < 0) | (t >= p.shape[0]))[0])
        raise IndexError(f"query {bad}: target index {int(t[bad])} outside pool of {p.shape[0]}")
    step = max(1, chunk_floats // max(1, p.shape[0]))
    out = np.empty(q.shape[0], dtype=np.int64)
    for s in range(0, q.shape[0], step):
        block = q[s : s + step] @ p.T
        out[s : s + step] = _ranks_from_matrix(block, t[s : s + step])
    return out


def ranks_per_example(
    queries: np.ndarray,
    candidate_ids: Sequence[Sequence[str]],
    target_ids: Sequence[str],
    id_to_row: Mapping[str, int],
    embeddings: np.ndarray,
    chunk_floats: int = _CHUNK_FLOATS,
) -> np.ndarray:
    """MMDialog protocol: each query ranks its own candidate list (which must contain its target).

    ``embeddings[id_to_row[cid]]`` is the embedding of candidate ``cid``.
    """
    q = np.asarray(queries, dtype=np.float32)
    e = np.asarray(embeddings, dtype=np.float32)
    n = q.shape[0]
    if len(candidate_ids) != n or len(target_ids) != n:
        raise ValueError(f"{n} queries, {len(candidate_ids)} candidate lists, {len(target_ids)} targets")
    if q.ndim != 2 or e.ndim != 2 or q.shape[1] != e.shape[1]:
        raise ValueError(f"queries {q.shape} and embeddings {e.shape} must share the last dimension")
    rows: list[np.ndarray] = []
    tpos = np.empty(n, dtype=np.int64)
    for i, (cands, tid) in enumerate(zip(candidate_ids, target_ids)):
        try:
            rows.append(np.fromiter((id_to_row[c] for c in cands), dtype=np.int64, count=len(cands)))
        except KeyError as err:
            raise KeyError(f"query {i}: candidate id {err.args[0]!r} has no embedding") from None
        hits = [j for j, c in enumerate(cands) if c == tid]
        if not hits:
            raise ValueError(f"query {i}: target id {tid!r} is not among its {len(cands)} candidates")
        tpos[i] = hits[0]
    out = np.empty(n, dtype=np.int64)
    pmax = max((len(r) for r in rows), default=1)
    step = max(1, chunk_floats // max(1, pmax * e.shape[1]))
    for s in range(0, n, step):
        chunk = rows[s : s + step]
        width = max(len(r) for r in chunk)
        idx = np.zeros((len(chunk), width), dtype=np.int64)
        valid = np.zeros((len(chunk), width), dtype=bool)
        for j, r in enumerate(chunk):
            idx[j, : len(r)] = r
            valid[j, : len(r)] = True
        scores = np.einsum("bcd,bd->bc", e[idx], q[s : s + step])
        out[s : s + step] = _ranks_from_matrix(scores, tpos[s : s + step], valid)
    return out


def grouped_metrics(
    ranks: Sequence[int] | np.ndarray, groups: Sequence[str], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, dict[str, float]]:
    """Metrics per retrieval type (e.g. ``dialog_to_image``, ``dialog_to_text``), keys sorted."""
    r = _as_ranks(ranks)
    g = np.asarray(groups, dtype=object)
    if g.shape[0] != r.shape[0]:
        raise ValueError(f"{g.shape[0]} group labels for {r.shape[0]} ranks")
    return {name: retrieval_metrics(r[g == name], ks) for name in sorted(set(g.tolist()))}


def markdown_table(results: Mapping[str, Mapping[str, float]], ks: Sequence[int] = DEFAULT_KS, title: str = "") -> str:
    """Rows = result names (e.g. retrieval type or model), columns = R@k, Sum, MRR, count."""
    cols = [f"R@{k}" for k in ks] + ["Sum", "MRR", "count"]
    head = f"| {title or 'name'} | " + " | ".join(cols) + " |"
    sep = "|---|" + "|".join("---:" for _ in cols) + "|"
    lines = [head, sep]
    for name, m in results.items():
        cells = [f"{int(m[c])}" if c == "count" else f"{m[c]:.2f}" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
