"""ANN recall measurement (index/ann_eval.py, bench/ann_recall.py) against exact search, on real FAISS."""

from __future__ import annotations

import numpy as np
import pytest

from dialclip_ray.index import ann_eval as A


@pytest.fixture(scope="module")
def data():
    x = A.clustered(6000, 32, clusters=30, seed=1)
    q = A.clustered(200, 32, clusters=30, seed=2)
    gt, flat_qps = A.exact_topk(x, q)
    return x, q, gt, flat_qps


def test_sharded_flat_search_is_exact(data):
    x, q, gt, _ = data
    indexes, offsets, _ = A.build_shards("flat", {}, x, shards=3)
    assert offsets == [0, 2000, 4000]
    assert A.recall_at(A.sharded_search(indexes, offsets, q, 10), gt) == 1.0


def test_ivf_recall_grows_with_nprobe_and_is_exact_when_every_list_is_probed(data):
    x, q, gt, flat_qps = data
    params = {"nlist": 16, "nprobe": 1, "max_train_points": 64}
    indexes, offsets, _ = A.build_shards("ivf", params, x, shards=2)
    rows = A.sweep("ivf", params, "nprobe", [1, 4, 16], indexes, offsets, q, gt)
    recalls = [r["recall_at_10"] for r in rows]
    assert recalls == sorted(recalls) and recalls[-1] == 1.0 and recalls[0] < 1.0
    assert [r["param"] for r in rows] == ["nprobe=1", "nprobe=4", "nprobe=16"]


def test_default_is_the_fastest_setting_meeting_both_targets_or_says_where_it_misses():
    rows = [{"param": "p=1", "recall_at_10": 0.80, "qps": 2000.0}, {"param": "p=2", "recall_at_10": 0.96, "qps": 1500.0},
            {"param": "p=4", "recall_at_10": 0.99, "qps": 900.0}]
    assert A.pick_default(rows, flat_qps=100.0)["param"] == "p=2"
    assert A.pick_default(rows, flat_qps=200.0) is None  # p=2 is only 7.5x flat
    note = A.why_no_default(rows, flat_qps=200.0)
    assert "best recall@10 is 0.800" in note and "first at p=2, 7.5x flat" in note
    assert "no setting reaches" in A.why_no_default(rows[:1], flat_qps=200.0)


def test_fitted_mixture_keeps_the_cluster_structure_in_a_larger_dimension():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((8, 16)).astype(np.float32)
    emb = centers[rng.integers(0, 8, 4000)] + 0.05 * rng.standard_normal((4000, 16)).astype(np.float32)
    mix = A.FittedMixture.fit(emb, clusters=8)
    x = mix.sample(3000, 64, seed=1)
    assert x.shape == (3000, 64) and np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    # tight clusters: a point's nearest neighbour is far closer than a random pair
    sims = x[:200] @ x.T
    np.fill_diagonal(sims[:, :200], -1)
    assert np.median(sims.max(axis=1)) > 0.95 > np.median(sims)
    with pytest.raises(ValueError, match="cannot place"):
        mix.sample(10, 8, seed=0)


def test_merge_replaces_only_the_pairs_measured_again():
    row = lambda d, i, r: {"data": d, "index": i, "param": "nprobe=1", "recall_at_10": r, "qps": 10.0,  # noqa: E731
                           "flat_qps": 1.0}
    old = {"command": "python bench/ann_recall.py", "threads": 2, "total_s": 9.0, "notes": {"model": "m"},
           "rows": [row("model", "ivf", 0.5), row("model", "hnsw", 0.6), row("uniform", "ivf", 0.1)]}
    new = {"command": "python bench/ann_recall.py --data model --kinds ivf --merge", "threads": 2, "total_s": 1.0,
           "notes": {"model": "m2"}, "rows": [row("model", "ivf", 0.97)]}
    merged = A.merge_results(old, new)
    assert [(r["data"], r["index"], r["recall_at_10"]) for r in merged["rows"]] == [
        ("model", "ivf", 0.97), ("model", "hnsw", 0.6), ("uniform", "ivf", 0.1)]
    assert [r["command"] for r in merged["runs"]] == [old["command"], new["command"]]
    assert A.default_of(merged["rows"], "model", "ivf")["default"] == "nprobe=1"
