"""Retrieval metrics against a brute-force reference, including ties and per-example pools."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dialclip_ray.evaluation.metrics import (
    grouped_metrics,
    markdown_table,
    mrr,
    rank_of_target,
    ranks_all_candidates,
    ranks_per_example,
    recall_at_k,
    retrieval_metrics,
)


def brute_rank(scores, t) -> int:
    """The documented definition, written as literally as possible."""
    higher = sum(1 for s in scores if s > scores[t])
    tied_others = sum(1 for i, s in enumerate(scores) if i != t and s == scores[t])
    return 1 + higher + tied_others


def brute_metrics(ranks, ks=(1, 5, 10)):
    n = len(ranks)
    out = {f"R@{k}": 100.0 * sum(r <= k for r in ranks) / n for k in ks}
    out["Sum"] = sum(out[f"R@{k}"] for k in ks)
    out["MRR"] = 100.0 * sum(1.0 / r for r in ranks) / n
    out["count"] = n
    return out


def test_rank_ties_count_against_model():
    assert rank_of_target(np.array([0.5, 0.9, 0.5, 0.1]), 0) == 3  # one higher + one tie
    assert rank_of_target(np.array([0.9, 0.5, 0.5]), 0) == 1
    # A collapsed model (all scores equal) gets the worst rank, not the best.
    assert rank_of_target(np.zeros(1000), 17) == 1000
    assert rank_of_target(np.array([np.nan, 0.2, 0.1]), 2) == 3  # NaN candidates count against too
    with pytest.raises(IndexError):
        rank_of_target(np.zeros(3), 3)
    with pytest.raises(ValueError, match="NaN"):
        rank_of_target(np.array([np.nan, 1.0]), 0)


def test_metrics_crafted():
    ranks = [1, 2, 5, 6, 10, 11, 100]
    m = retrieval_metrics(ranks)
    assert m == pytest.approx(brute_metrics(ranks))
    assert m["R@1"] == pytest.approx(100 / 7) and m["R@10"] == pytest.approx(500 / 7)
    assert recall_at_k(ranks, 5) == pytest.approx(300 / 7)  # percent, like everything reported
    assert mrr([1, 2, 4]) == pytest.approx(100 * (1 + 0.5 + 0.25) / 3)
    assert recall_at_k(ranks, 5) == m["R@5"] and mrr(ranks) == m["MRR"]
    with pytest.raises(ValueError, match="1-based"):
        retrieval_metrics([0, 1])


def test_all_candidates_with_ties_and_chunking():
    # Integer-valued embeddings give exact float32 dot products, so ties are real ties.
    pool = np.array([[1, 0], [0, 1], [1, 0], [1, 1], [0, 0]], dtype=np.float32)
    queries = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=np.float32)
    targets = [0, 1, 3, 4]
    got = ranks_all_candidates(queries, pool, targets, chunk_floats=7)  # forces 1 query per chunk
    want = [brute_rank(pool @ q, t) for q, t in zip(queries, targets)]
    assert got.tolist() == want == [3, 2, 1, 5]  # [0,1] ties with [1,1]; [0,0] ties with all
    with pytest.raises(IndexError, match="query 1"):
        ranks_all_candidates(queries[:2], pool, [0, 9])


def test_per_example_pools_variable_length():
    rng = np.random.default_rng(0)
    emb = rng.integers(-2, 3, size=(12, 4)).astype(np.float32)
    ids = [f"-{i}x" for i in range(12)]  # MMDialog keys may start with '-'; never numbers
    id_to_row = {c: i for i, c in enumerate(ids)}
    queries = rng.integers(-2, 3, size=(5, 4)).astype(np.float32)
    cands = [ids[0:3], ids[2:12], ids[5:6], ids[::2], ids[1:8]]
    targets = [cands[0][1], cands[1][-1], cands[2][0], cands[3][2], cands[4][0]]
    got = ranks_per_example(queries, cands, targets, id_to_row, emb, chunk_floats=50)
    want = []
    for q, c, t in zip(queries, cands, targets):
        scores = [float(emb[id_to_row[x]] @ q) for x in c]
        want.append(brute_rank(scores, c.index(t)))
    assert got.tolist() == want
    with pytest.raises(ValueError, match="query 0: target id 'nope'"):
        ranks_per_example(queries[:1], [ids[:3]], ["nope"], id_to_row, emb)
    with pytest.raises(KeyError, match="query 0: candidate id 'zz'"):
        ranks_per_example(queries[:1], [["zz", ids[0]]], [ids[0]], id_to_row, emb)


def test_grouped_and_table():
    ranks = [1, 3, 20, 1, 1]
    groups = ["dialog_to_image", "dialog_to_image", "dialog_to_image", "dialog_to_text", "dialog_to_text"]
    g = grouped_metrics(ranks, groups)
    assert list(g) == ["dialog_to_image", "dialog_to_text"]
    assert g["dialog_to_image"] == pytest.approx(brute_metrics([1, 3, 20]))
    assert g["dialog_to_text"]["R@1"] == 100.0 and g["dialog_to_text"]["count"] == 2
    table = markdown_table(g, title="type")
    assert table.splitlines()[0] == "| type | R@1 | R@5 | R@10 | Sum | MRR | count |"
    assert "| dialog_to_image | 33.33 | 66.67 | 66.67 | 166.67 | 46.11 | 3 |" in table


small_ints = st.integers(min_value=-3, max_value=3)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 12),
    q=st.integers(1, 6),
    d=st.integers(1, 4),
    chunk=st.integers(1, 40),
)
def test_property_matches_brute_force(data, n, q, d, chunk):
    pool = np.array(data.draw(st.lists(st.lists(small_ints, min_size=d, max_size=d), min_size=n, max_size=n)),
                    dtype=np.float32).reshape(n, d)
    queries = np.array(data.draw(st.lists(st.lists(small_ints, min_size=d, max_size=d), min_size=q, max_size=q)),
                       dtype=np.float32).reshape(q, d)
    targets = data.draw(st.lists(st.integers(0, n - 1), min_size=q, max_size=q))
    got = ranks_all_candidates(queries, pool, targets, chunk_floats=chunk)
    want = [brute_rank((pool @ x).tolist(), t) for x, t in zip(queries, targets)]
    assert got.tolist() == want
    assert all(1 <= r <= n for r in want)
    # Per-example protocol over random sub-pools of the same data agrees with the same definition.
    ids = [f"c{i}" for i in range(n)]
    cands = [data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=n, unique=True)) for _ in range(q)]
    tids = [data.draw(st.sampled_from(c)) for c in cands]
    got2 = ranks_per_example(queries, cands, tids, {c: i for i, c in enumerate(ids)}, pool, chunk_floats=chunk)
    want2 = [brute_rank([float(pool[int(c[1:])] @ x) for c in cl], cl.index(t)) for x, cl, t in zip(queries, cands, tids)]
    assert got2.tolist() == want2
    m = retrieval_metrics(got)
    assert m["R@1"] <= m["R@5"] <= m["R@10"] and m == pytest.approx(brute_metrics(want))
