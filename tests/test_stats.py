"""Bootstrap statistics of retrieval metrics (dialclip_ray.evaluation.stats) on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from dialclip_ray.evaluation.metrics import retrieval_metrics
from dialclip_ray.evaluation.stats import (bootstrap_mean, metric_estimates, paired_difference, paired_differences,
                                           per_query_metrics)


def test_per_query_hits_from_ranks_match_the_aggregate_metrics():
    ranks = np.array([1, 2, 5, 6, 10, 11, 1000])
    per = per_query_metrics(ranks)
    assert per["R@1"].tolist() == [100, 0, 0, 0, 0, 0, 0]
    assert per["R@5"].tolist() == [100, 100, 100, 0, 0, 0, 0]
    assert per["R@10"].tolist() == [100, 100, 100, 100, 100, 0, 0]
    assert per["Sum"].tolist() == [300, 200, 200, 100, 100, 0, 0]
    agg = retrieval_metrics(ranks)
    for m in ("R@1", "R@5", "R@10", "Sum"):
        assert per[m].mean() == pytest.approx(agg[m])
    assert per_query_metrics(np.ones((3, 4), dtype=int))["Sum"].shape == (3, 4)  # seeds x queries
    with pytest.raises(ValueError, match="1-based"):
        per_query_metrics([0, 1])


def test_identical_variants_differ_by_exactly_zero():
    rng = np.random.default_rng(0)
    ranks = rng.integers(1, 1000, size=500)
    for metric in ("Sum", "R@1"):
        d = paired_difference(ranks, ranks.copy(), metric, n_boot=2000)
        assert d.diff == 0 and d.ci95 == [0.0, 0.0] and not d.significant
        assert d.p_boot == 1.0


def test_a_variant_right_on_strictly_more_queries_is_significantly_better():
    n = 1000
    b = np.full(n, 50)  # b misses every query at k <= 10
    b[:200] = 1  # ...except 200
    a = b.copy()
    a[200:260] = 1  # a: right on the same 200 plus 60 more (6 points of R@1)
    d = paired_difference(a, b, "R@1", n_boot=5000)
    assert d.diff == pytest.approx(6.0)
    assert d.significant and d.ci95[0] > 0 and d.p_boot < 0.01
    s = paired_difference(a, b, "Sum", n_boot=5000)
    assert s.diff == pytest.approx(18.0) and s.ci95[0] > 0
    rev = paired_difference(b, a, "R@1", n_boot=5000)  # antisymmetric
    assert rev.diff == pytest.approx(-6.0) and rev.ci95[1] < 0


def test_pairing_detects_what_unpaired_intervals_cannot():
    """Two variants with equal marginal accuracy up to 1 point: unpaired CIs overlap, the paired one does not."""
    rng = np.random.default_rng(1)
    n = 2000
    b = np.where(rng.random(n) < 0.4, 1, 100)
    a = b.copy()
    a[np.flatnonzero(b == 100)[:20]] = 1  # +20 queries right, none lost
    ea, eb = bootstrap_mean(per_query_metrics(a)["R@1"], n_boot=3000), bootstrap_mean(
        per_query_metrics(b)["R@1"], n_boot=3000)
    assert ea.ci95[0] < eb.ci95[1]  # the unpaired intervals overlap
    assert paired_difference(a, b, "R@1", n_boot=3000).ci95[0] > 0


def test_interval_width_shrinks_with_the_number_of_queries():
    rng = np.random.default_rng(2)
    widths = []
    for n in (100, 400, 1600):
        e = bootstrap_mean(100.0 * (rng.random(n) < 0.3), n_boot=3000, seed=0)
        assert e.ci95[0] <= e.mean <= e.ci95[1]
        widths.append(e.ci95[1] - e.ci95[0])
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(4.0, rel=0.25)  # ~ 1 / sqrt(n)


def test_bootstrap_is_seeded_and_matches_the_normal_approximation():
    v = 100.0 * (np.arange(1000) % 4 == 0)  # 25% hits
    e1, e2 = bootstrap_mean(v, n_boot=4000, seed=7), bootstrap_mean(v, n_boot=4000, seed=7)
    assert e1 == e2
    assert e1.mean == pytest.approx(25.0)
    se = 100 * np.sqrt(0.25 * 0.75 / 1000)
    assert e1.ci95[0] == pytest.approx(25 - 1.96 * se, abs=0.4)
    assert e1.ci95[1] == pytest.approx(25 + 1.96 * se, abs=0.4)


def test_seeds_are_resampled_too():
    """Seed-to-seed variation widens the interval; identical seeds give the single-seed interval."""
    rng = np.random.default_rng(3)
    base = np.where(rng.random(800) < 0.3, 1, 50)
    same = np.stack([base, base, base])
    e1 = metric_estimates(base, n_boot=3000)["R@1"]
    e3 = metric_estimates(same, n_boot=3000)["R@1"]
    assert e3.mean == pytest.approx(e1.mean) and e3.n_seeds == 3
    assert e3.ci95 == pytest.approx(e1.ci95, abs=0.3)
    spread = np.stack([np.where(rng.random(800) < p, 1, 50) for p in (0.2, 0.3, 0.4)])
    wide = metric_estimates(spread, n_boot=3000)["R@1"]
    assert wide.ci95[1] - wide.ci95[0] > 1.5 * (e1.ci95[1] - e1.ci95[0])
    d = paired_difference(spread, same, "R@1", n_boot=3000)
    assert d.seeds == (3, 3) and d.ci95[0] < 0 < d.ci95[1]


def test_paired_difference_rejects_different_query_sets():
    with pytest.raises(ValueError, match="same queries"):
        paired_difference(np.ones(10, dtype=int), np.ones(11, dtype=int))
    with pytest.raises(KeyError, match="MRR"):
        paired_difference(np.ones(10, dtype=int), np.ones(10, dtype=int), "MRR")


def test_several_metrics_share_one_query_draw():
    rng = np.random.default_rng(4)
    a, b = rng.integers(1, 30, size=(2, 600)), rng.integers(1, 30, size=600)
    both = paired_differences(a, b, ("Sum", "R@1"), n_boot=2000)
    for m in ("Sum", "R@1"):  # the same draws whether a metric is tested alone or with others
        alone = paired_difference(a, b, m, n_boot=2000)
        assert both[m].diff == pytest.approx(alone.diff) and both[m].ci95 == pytest.approx(alone.ci95)
    est = metric_estimates(a, n_boot=2000)
    assert set(est) == {"R@1", "R@5", "R@10", "Sum"}
    assert est["Sum"].mean == pytest.approx(est["R@1"].mean + est["R@5"].mean + est["R@10"].mean)
