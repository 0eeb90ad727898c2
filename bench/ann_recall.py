"""ANN recall against speed at serving scale: 1M x 512 vectors in 4 shards, three kinds of data.

For each data kind (``model``: the cluster structure of dialclip-small's own embeddings of the
benchmark corpus, read from its frozen feature stores; ``clustered``; ``uniform``, the worst case)
and each index kind (ivf, ivfpq, hnsw), builds the index in shards as ``dialclip index build`` does,
sweeps the search knob (nprobe, efSearch) and records recall@10 against exact search and queries/s
(batch of queries, FAISS threads as given). Picks, per data and index, the fastest setting with
recall@10 >= 0.95 at >= 10x flat search's queries/s, or says that none reaches it.

    python bench/ann_recall.py                   # 1,000,000 vectors (about 15-25 min on 2 cores)
    python bench/ann_recall.py --vectors 100000 --out bench/results/ann_recall_100k
    python bench/ann_recall.py --kinds ivf,ivfpq # HNSW's graph build is the slow part on CPU
    python bench/ann_recall.py --data model --kinds ivf --merge   # remeasure one pair, keep the rest

Writes bench/results/ann_recall.json ({"rows": [...], "defaults": [...], ...}), .md and .png.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq

from dialclip_ray.fsio import atomic_write_text
from dialclip_ray.index import ann_eval as A

RESULTS = Path(__file__).resolve().parent / "results"
STORES = "runs/cache/synth-pc4000-*/*/features/dialclip-small-*/*.parquet"


def model_embeddings(pattern: str) -> np.ndarray:
    """Every feature the benchmark's stores hold (context turns and images of both datasets)."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"no feature stores match {pattern}: run `python bench/synthetic_benchmark.py` first "
                         f"(or pass --data clustered,uniform)")
    parts = []
    for f in files:
        col = pq.read_table(f, columns=["feature"]).column("feature").combine_chunks()
        if len(col):
            parts.append(col.flatten().to_numpy().reshape(len(col), -1).astype(np.float32))
    return np.concatenate(parts)


def configs(n: int, shards: int) -> dict[str, tuple[dict, str, list[int]]]:
    per_shard = n // shards
    nlist = 2 ** round(math.log2(max(16, 4 * math.sqrt(per_shard))))
    ivf = {"nlist": nlist, "nprobe": 1, "max_train_points": 64}
    # half-octave steps: the recall >= 0.95 at >= 10x flat point often falls between two powers of two
    probes = [p for p in (1, 2, 3, 4, 6, 8, 10, 12, 16, 24, 32, 48, 64, 128) if p <= nlist]
    return {"ivf": (ivf, "nprobe", probes), "ivfpq": ({**ivf, "m": 64, "nbits": 8}, "nprobe", probes),
            "hnsw": ({"M": 16, "ef_construction": 40, "ef_search": 16}, "ef_search", [16, 24, 32, 48, 64, 128, 256])}


def run_data(name: str, x: np.ndarray, q: np.ndarray, args) -> list[dict]:
    gt, flat_qps = A.exact_topk(x, q)
    print(f"[{name}] flat: {flat_qps:.1f} queries/s", flush=True)
    rows = []
    for kind in args.kinds:
        params, knob, values = configs(len(x), args.shards)[kind]
        indexes, offsets, build_s = A.build_shards(kind, params, x, args.shards)
        found = A.sweep(kind, params, knob, values, indexes, offsets, q, gt)
        for r in found:
            rows.append({"index": kind, **r, "vectors": len(x), "data": name, "flat_qps": round(flat_qps, 1),
                         "shards": args.shards, "build_s": round(build_s, 1), "params": params})
        print(f"[{name}] {kind}: build {build_s:.0f}s; " + "  ".join(
            f"{r['param']}: {r['recall_at_10']:.3f} @ {r['qps']:.0f}/s" for r in found), flush=True)
        del indexes
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datas = list(dict.fromkeys(r["data"] for r in rows))
    fig, axes = plt.subplots(1, len(datas), figsize=(5.5 * len(datas), 4.3), squeeze=False, sharey=True)
    for ax, data in zip(axes[0], datas):
        sub = [r for r in rows if r["data"] == data]
        for kind in dict.fromkeys(r["index"] for r in sub):
            pts = [r for r in sub if r["index"] == kind]
            ax.plot([r["qps"] for r in pts], [r["recall_at_10"] for r in pts], marker="o", label=kind)
        flat = sub[0]["flat_qps"]
        ax.axvline(flat, color="grey", ls=":", label="flat (exact)")
        ax.axvline(10 * flat, color="grey", ls="--", label="10x flat")
        ax.axhline(0.95, color="red", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("queries/s (batch, 4 shards)")
        ax.set_title(f"{data}: {sub[0]['vectors']:,} x 512")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("recall@10 vs exact")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--data", default="model,clustered,uniform")
    ap.add_argument("--kinds", default="ivf,ivfpq,hnsw")
    ap.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads (default: FAISS's choice)")
    ap.add_argument("--stores", default=STORES, help="glob of feature-store Parquet files (the model data)")
    ap.add_argument("--out", default=str(RESULTS / "ann_recall"))
    ap.add_argument("--merge", action="store_true",
                    help="replace only the (data, index) pairs measured now in an existing --out JSON")
    args = ap.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    t0 = time.time()
    rows, notes = [], {}
    for name in [d for d in args.data.split(",") if d]:
        if name == "model":
            emb = model_embeddings(args.stores)
            mix = A.FittedMixture.fit(emb, clusters=256)
            notes["model"] = (f"k-means ({len(mix.weights)} clusters) and per-cluster spread of {len(emb):,} "
                              f"dialclip-small embeddings ({emb.shape[1]}-d) of the benchmark corpus, placed in "
                              f"{args.dim}-d by a random orthonormal map")
            x, q = mix.sample(args.vectors, args.dim, seed=1), mix.sample(args.queries, args.dim, seed=2)
        elif name == "clustered":
            c = max(100, args.vectors // 200)
            x, q = A.clustered(args.vectors, args.dim, c, seed=1), A.clustered(args.queries, args.dim, c, seed=2)
        elif name == "uniform":
            x, q = A.uniform(args.vectors, args.dim, seed=1), A.uniform(args.queries, args.dim, seed=2)
        else:
            raise SystemExit(f"unknown --data {name!r}")
        rows += run_data(name, x, q, args)
        del x
    out = Path(args.out)
    command = "python bench/ann_recall.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"command": command.strip(), "threads": faiss.omp_get_max_threads(), "queries": args.queries, "k": 10,
              "notes": notes, "rows": rows, "total_s": round(time.time() - t0, 1)}
    if args.merge and out.with_suffix(".json").is_file():
        report = A.merge_results(json.loads(out.with_suffix(".json").read_text()), report)
    rows = report["rows"]
    pairs = dict.fromkeys((r["data"], r["index"]) for r in rows)
    report["defaults"] = defaults = [A.default_of(rows, d, i) for d, i in pairs]
    atomic_write_text(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    lines = ["| data | index | param | recall@10 | queries/s | x flat |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['data']} | {r['index']} | {r['param']} | {r['recall_at_10']:.3f} | {r['qps']:.0f} | "
              f"{r['qps'] / r['flat_qps']:.1f} |" for r in rows]
    lines += ["", "| data | index | default (recall@10 >= 0.95 at >= 10x flat) |", "|---|---|---|"]
    lines += [f"| {d['data']} | {d['index']} | {d['default'] or d['note']} |" for d in defaults]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    plot(rows, out.with_suffix(".png"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
