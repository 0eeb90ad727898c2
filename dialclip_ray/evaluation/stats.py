"""Uncertainty of retrieval metrics: per-query hits, bootstrap CIs, paired differences between variants.

Every metric of ``metrics.py`` is a mean over test queries of a per-query value
(``100 * [rank <= k]``; Sum adds the three), so its uncertainty comes from which
queries happen to be in the test set. We estimate it with the percentile bootstrap:
resample queries with replacement, recompute the mean, take the 2.5th and 97.5th
percentiles of ``n_boot`` replicates. Everything is vectorised numpy and seeded, so
the same ranks always give the same interval.

Several training seeds of one variant (arrays ``[S, Q]``: seed x query, the same
queries in the same order) are handled by a two-stage bootstrap: each replicate
draws S seeds with replacement *and* Q queries with replacement (one query draw
shared by all seeds, since the seeds answer the same queries) and averages the
drawn seeds' per-query values over the drawn queries. The point estimate is the
mean over seeds and queries; the interval therefore covers both the test-set
sampling and the seed-to-seed variation of training. With one seed it reduces to the
plain query bootstrap. (With 3 seeds the seed stage is coarse, 10 distinct seed
multisets; it still widens the interval when seeds disagree, which the seed-mean
with a query-only CI would hide.)

Paired differences (variant A minus variant B on the same queries) resample one
query draw per replicate for both variants, so the query difficulty cancels: this is
what makes a 1-2 point difference on 1,000 queries detectable when the unpaired CIs
overlap. Seeds of A and B are drawn independently (different training runs).
``p_boot`` is the two-sided bootstrap p-value, ``2 * min(P(diff <= 0), P(diff >= 0))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dialclip_ray.evaluation.metrics import DEFAULT_KS

METRICS = ("R@1", "R@5", "R@10", "Sum")
N_BOOT = 10_000
_CHUNK_CELLS = 4_000_000  # replicates x queries per vectorised block (32 MB of float64)


def per_query_metrics(ranks: Sequence[int] | np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, np.ndarray]:
    """``{"R@k": 100 * [rank <= k] per query, ..., "Sum": their sum}`` (float arrays, the ranks' shape).

    ``ranks`` are 1-based (``metrics.ranks_*``); any shape, e.g. ``[Q]`` or ``[S, Q]``.
    """
    r = np.asarray(ranks)
    if r.size and (not np.issubdtype(r.dtype, np.integer) or r.min() < 1):
        raise ValueError("ranks must be 1-based integers")
    out = {f"R@{k}": 100.0 * (r <= k) for k in ks}
    out["Sum"] = np.sum([out[f"R@{k}"] for k in ks], axis=0) if ks else np.zeros(r.shape)
    return out


def _as_seed_matrix(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[None, :]
    if v.ndim != 2 or v.shape[1] == 0:
        raise ValueError(f"expected per-query values [Q] or [S, Q] with Q >= 1, got shape {v.shape}")
    return v


def _replicates(values_a: Sequence[np.ndarray], values_b: Sequence[np.ndarray] | None, n_boot: int,
                seed: int) -> np.ndarray:
    """Bootstrap replicates ``[M, n_boot]`` of mean(A_m) (or mean(A_m) - mean(B_m)) for M metrics at once.

    Each replicate draws Q queries with replacement (as per-query counts, shared by the M metrics,
    by A and B, and by all seeds) and S seeds with replacement (weights, drawn separately for A and
    B); the replicate is ``sum_q count_q * sum_s w_s * v[s, q] / Q``: one matrix product per block.
    """
    a = [_as_seed_matrix(v) for v in values_a]
    b = None if values_b is None else [_as_seed_matrix(v) for v in values_b]
    q = a[0].shape[1]
    if any(m.shape != a[0].shape for m in a) or (b is not None and any(m.shape != b[0].shape for m in b)):
        raise ValueError("every metric needs the same [S, Q] shape")
    if b is not None and b[0].shape[1] != q:
        raise ValueError(f"paired comparison needs the same queries: {q} vs {b[0].shape[1]}")
    sa = a[0].shape[0]
    sb = 0 if b is None else b[0].shape[0]
    stacked = np.concatenate(a + (b or []), axis=0)  # [M*Sa (+ M*Sb), Q]
    n_metrics = len(a)
    rng = np.random.default_rng(seed)
    out = np.empty((n_metrics, n_boot))
    step = max(1, _CHUNK_CELLS // q)
    for start in range(0, n_boot, step):
        n = min(step, n_boot - start)
        draws = rng.integers(0, q, size=(n, q)) + (np.arange(n) * q)[:, None]
        counts = np.bincount(draws.ravel(), minlength=n * q).reshape(n, q).astype(np.float64)
        sums = counts @ stacked.T / q  # [n, M*Sa (+ M*Sb)]: each seed's mean over the drawn queries

        def seed_mean(block: np.ndarray, s: int) -> np.ndarray:  # [n, M*s] -> [n, M]
            block = block.reshape(n, n_metrics, s)
            if s == 1:
                return block[:, :, 0]
            w = rng.multinomial(s, np.full(s, 1.0 / s), size=n) / s
            return np.einsum("nms,ns->nm", block, w)

        rep = seed_mean(sums[:, : n_metrics * sa], sa)
        if b is not None:
            rep = rep - seed_mean(sums[:, n_metrics * sa:], sb)
        out[:, start:start + n] = rep.T
    return out


def _interval(reps: np.ndarray, level: float) -> list[float]:
    lo, hi = np.percentile(reps, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


@dataclass(frozen=True)
class Estimate:
    """A mean (percent) with its bootstrap interval; ``n_queries`` / ``n_seeds`` it was computed from."""

    mean: float
    ci95: list[float]
    n_queries: int
    n_seeds: int

    def as_dict(self) -> dict:
        return {"mean": round(self.mean, 4), "ci95": [round(x, 4) for x in self.ci95],
                "queries": self.n_queries, "seeds": self.n_seeds}


def bootstrap_mean(values: Sequence[float] | np.ndarray, n_boot: int = N_BOOT, seed: int = 0,
                   level: float = 0.95) -> Estimate:
    """Mean of per-query values (``[Q]`` or ``[S, Q]``) with its percentile-bootstrap interval."""
    v = _as_seed_matrix(np.asarray(values))
    return Estimate(float(v.mean()), _interval(_replicates([v], None, n_boot, seed)[0], level), v.shape[1],
                    v.shape[0])


def metric_estimates(ranks: Sequence[int] | np.ndarray, ks: Sequence[int] = DEFAULT_KS, n_boot: int = N_BOOT,
                     seed: int = 0) -> dict[str, Estimate]:
    """R@k and Sum of ``ranks`` (``[Q]`` or ``[S, Q]``), each with its 95% bootstrap CI."""
    per = {m: _as_seed_matrix(v) for m, v in per_query_metrics(np.asarray(ranks), ks).items()}
    reps = _replicates(list(per.values()), None, n_boot, seed)  # one query draw shared by the metrics
    return {m: Estimate(float(v.mean()), _interval(r, 0.95), v.shape[1], v.shape[0])
            for (m, v), r in zip(per.items(), reps)}


@dataclass(frozen=True)
class PairedDiff:
    """``a - b`` of a metric on the same queries: point estimate, 95% CI and bootstrap p-value."""

    metric: str
    diff: float
    ci95: list[float]
    p_boot: float
    n_queries: int
    seeds: tuple[int, int]

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.ci95[0] > 0 or self.ci95[1] < 0

    def as_dict(self) -> dict:
        return {"metric": self.metric, "diff": round(self.diff, 4), "ci95": [round(x, 4) for x in self.ci95],
                "p_boot": round(self.p_boot, 5), "queries": self.n_queries, "seeds": list(self.seeds)}


def paired_differences(ranks_a: Sequence[int] | np.ndarray, ranks_b: Sequence[int] | np.ndarray,
                       metrics: Sequence[str] = ("Sum", "R@1"), ks: Sequence[int] = DEFAULT_KS, n_boot: int = N_BOOT,
                       seed: int = 0, level: float = 0.95) -> dict[str, PairedDiff]:
    """Paired bootstrap of ``metric(a) - metric(b)`` for several metrics (one query draw shared by all);
    ranks ``[Q]`` or ``[S, Q]`` over the same Q queries in the same order."""
    pa = per_query_metrics(np.asarray(ranks_a), ks)
    pb = per_query_metrics(np.asarray(ranks_b), ks)
    for m in metrics:
        if m not in pa:
            raise KeyError(f"unknown metric {m!r}; known: {list(pa)}")
    a = [_as_seed_matrix(pa[m]) for m in metrics]
    b = [_as_seed_matrix(pb[m]) for m in metrics]
    reps = _replicates(a, b, n_boot, seed)
    out = {}
    for m, am, bm, r in zip(metrics, a, b, reps):
        p = 2 * min(float(np.mean(r <= 0)), float(np.mean(r >= 0)))
        out[m] = PairedDiff(m, float(am.mean() - bm.mean()), _interval(r, level), min(1.0, p), am.shape[1],
                            (am.shape[0], bm.shape[0]))
    return out


def paired_difference(ranks_a: Sequence[int] | np.ndarray, ranks_b: Sequence[int] | np.ndarray,
                      metric: str = "Sum", ks: Sequence[int] = DEFAULT_KS, n_boot: int = N_BOOT,
                      seed: int = 0, level: float = 0.95) -> PairedDiff:
    """Paired bootstrap of ``metric(a) - metric(b)``; ranks ``[Q]`` or ``[S, Q]`` over the same Q queries."""
    return paired_differences(ranks_a, ranks_b, (metric,), ks, n_boot, seed, level)[metric]
