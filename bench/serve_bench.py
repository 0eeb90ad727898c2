"""Serving benchmark: /v1/retrieve latency and throughput vs the same encode + search in one process.

A closed loop of C concurrent HTTP clients (asyncio + httpx, loopback only) sends
text dialogs to the Serve app for a bounded number of requests; the baseline runs
the same checkpoint's ``DialogEncoder`` and a ``ShardedIndex`` of the same index
sequentially in this process, in the same run. ``serve/baseline`` p50 at C=1 is
Serve's overhead (HTTP proxy, ingress, encoder and shard hops, merge).

Index: random unit vectors (flat, exact) with the model's embedding dimension, since
a real index's dim must equal the query encoder's. Models:

    python bench/serve_bench.py            # ViT-B-32 config (dim 512, random init), 1M vectors, 1/2/4 shards
    python bench/serve_bench.py --quick    # dialclip-tiny (dim 128), 100k vectors

Shards are pinned to one replica each (no autoscaling) so runs are comparable; one
thread per replica and for the baseline. Writes bench/results/serve_bench{suffix}.json/.md/.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

WORDS = ("dog cat beach pizza sunset mountain car birthday cake guitar coffee rain city train flower baby "
         "party snow garden book lake bike friend photo look this my new today yesterday weekend").split()


def make_checkpoint(work: Path, model_name: str) -> Path:
    """A checkpoint whose (random-init) backbone weights are a file, so every replica loads identical ones."""
    import torch

    from dialclip_ray.model.backbone import load_backbone
    from dialclip_ray.model.checkpoint import save_checkpoint
    from dialclip_ray.model.config import BackboneConfig, preset
    from dialclip_ray.model.dialclip import build_model

    ckpt = work / f"ckpt-{model_name}"
    if (ckpt / "dialclip.pt").exists():
        return ckpt
    weights = work / f"{model_name}-backbone.pt"
    torch.manual_seed(0)
    torch.save(load_backbone(model_name).model.state_dict(), weights)
    backbone = load_backbone(model_name, str(weights))
    cfg = preset("default", backbone=BackboneConfig(model_name=model_name, pretrained=str(weights)))
    model, _ = build_model(cfg, backbone)
    return save_checkpoint(model, ckpt)


def random_index(out: Path, n: int, dim: int, shards: int, identity: dict, seed: int = 0) -> Path:
    import faiss
    import pyarrow as pa

    from dialclip_ray.index.layout import write_index

    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, dim), dtype=np.float32)
    faiss.normalize_L2(vecs)
    ids = [f"img{i:07d}" for i in range(n)]
    meta = pa.table({"path": pa.array([f"images/{i}.jpg" for i in ids], pa.string())})
    if out.exists():
        shutil.rmtree(out)
    write_index(out, {"image": (ids, vecs, meta)}, identity, shards=shards, kind="flat")
    return out


def dialogs(count: int, k: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        turns = [{"speaker": t % 2, "text": " ".join(rng.choice(WORDS, rng.integers(4, 12)))}
                 for t in range(rng.integers(1, 5))]
        out.append({"context": turns, "current": " ".join(rng.choice(WORDS, 3)), "target": "image", "k": k})
    return out


def stats(latencies: list[float], seconds: float) -> dict:
    lat = np.asarray(latencies) * 1000
    return {"requests": len(lat), "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "mean_ms": float(lat.mean()), "throughput_rps": len(lat) / seconds}


async def closed_loop(url: str, bodies: list[dict], concurrency: int, requests: int, max_seconds: float) -> dict:
    import httpx

    latencies, errors, sent = [], 0, 0
    t0 = time.perf_counter()

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal errors, sent
        while sent < requests and time.perf_counter() - t0 < max_seconds:
            body = bodies[sent % len(bodies)]
            sent += 1
            t = time.perf_counter()
            r = await c.post(url, json=body)
            latencies.append(time.perf_counter() - t)
            errors += r.status_code != 200

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
    return {**stats(latencies, time.perf_counter() - t0), "concurrency": concurrency, "errors": errors}


def baseline(ckpt: Path, index_dir: Path, bodies: list[dict], requests: int, concurrency: int = 1) -> dict:
    """Encode + search in this process at the same concurrency (a closed loop of ``concurrency`` threads;
    torch and FAISS release the GIL), one thread each for torch and FAISS, like a replica."""
    import threading

    import faiss
    import torch

    from dialclip_ray.index import ShardedIndex
    from dialclip_ray.serving.dialogs import DialogEncoder
    from dialclip_ray.serving.schemas import RetrieveRequest

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    encoder = DialogEncoder(str(ckpt), [])
    index = ShardedIndex(index_dir / "image")
    reqs = [RetrieveRequest.model_validate(b) for b in bodies]
    for r in reqs[:3]:  # warm-up
        index.search(encoder.encode([r])[0]["embedding"][None], r.k)
    latencies, lock, counter = [], threading.Lock(), iter(range(requests))

    def client() -> None:
        for i in counter:  # shared iterator: each request index is taken once
            r = reqs[i % len(reqs)]
            t = time.perf_counter()
            index.search(encoder.encode([r])[0]["embedding"][None], r.k)
            with lock:
                latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {**stats(latencies, time.perf_counter() - t0), "concurrency": concurrency}


def write_report(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# Serve benchmark ({result['config']['model']}, {result['config']['vectors']:,} vectors of dim "
             f"{result['config']['dim']}, flat)", "",
             "| shards | concurrency | Serve p50 / p99 ms | in-process p50 / p99 ms | p99 ratio (goal <= 2) "
             "| Serve req/s | in-process req/s | errors |", "|---|---:|---|---|---:|---:|---:|---:|"]
    for run in result["runs"]:
        base = {b["concurrency"]: b for b in run["baseline"]}
        for s in run["serve"]:
            b = base[s["concurrency"]]
            lines.append(f"| {run['shards']} | {s['concurrency']} | {s['p50_ms']:.1f} / {s['p99_ms']:.1f} | "
                         f"{b['p50_ms']:.1f} / {b['p99_ms']:.1f} | {s['p99_ms'] / b['p99_ms']:.2f} | "
                         f"{s['throughput_rps']:.1f} | {b['throughput_rps']:.1f} | {s['errors']} |")
    lines += ["", f"Machine: {result['machine']}. Ray CPUs: {result['config']['ray_cpus']}. "
              f"Command: `{result['command']}`", ""]
    out.with_suffix(".md").write_text("\n".join(lines))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    shards = [r["shards"] for r in result["runs"]]
    for c in result["config"]["concurrency"]:
        p50 = [next(s["p50_ms"] for s in r["serve"] if s["concurrency"] == c) for r in result["runs"]]
        rps = [next(s["throughput_rps"] for s in r["serve"] if s["concurrency"] == c) for r in result["runs"]]
        axes[0].plot(shards, p50, "o-", label=f"Serve, {c} clients")
        axes[1].plot(shards, rps, "o-", label=f"Serve, {c} clients")
    for c in result["config"]["concurrency"]:
        base = [next(b for b in r["baseline"] if b["concurrency"] == c) for r in result["runs"]]
        axes[0].plot(shards, [b["p50_ms"] for b in base], "--", label=f"in-process, {c} threads")
        axes[1].plot(shards, [b["throughput_rps"] for b in base], "--", label=f"in-process, {c} threads")
    axes[0].set(xlabel="shards", ylabel="p50 latency (ms)", xticks=shards)
    axes[1].set(xlabel="shards", ylabel="throughput (req/s)", xticks=shards)
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"/v1/retrieve, {result['config']['vectors']:,} x {result['config']['dim']} flat")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="dialclip-tiny (dim 128), 100k vectors, fewer requests")
    p.add_argument("--model", default=None, help="open_clip model name (default ViT-B-32, quick: dialclip-tiny)")
    p.add_argument("--vectors", type=int, default=None)
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=None, help="requests per closed-loop run")
    p.add_argument("--max-seconds", type=float, default=60.0, help="time bound of each closed-loop run")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--work", default="/tmp/dialclip-serve-bench", help="scratch dir for checkpoint and indexes")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model = args.model or ("dialclip-tiny" if args.quick else "ViT-B-32")
    n = args.vectors or (100_000 if args.quick else 1_000_000)
    requests = args.requests or (100 if args.quick else 400)
    out = Path(args.out or Path(__file__).parent / "results" / f"serve_bench{'_quick' if args.quick else ''}")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    import ray
    from ray import serve
    from tqdm.auto import tqdm

    from dialclip_ray.index.layout import checkpoint_identity
    from dialclip_ray.model.backbone import backbone_geometry
    from dialclip_ray.runtime import disable_usage_stats
    from dialclip_ray.serving.app import build_app
    from dialclip_ray.serving.loopback import free_port

    dim = backbone_geometry(model).embed_dim
    ckpt = make_checkpoint(work, model)
    identity = checkpoint_identity(ckpt)
    bodies = dialogs(64, args.k)
    disable_usage_stats()  # this bench sizes its own cluster (--ray-cpus) so runs stay comparable
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    runs = []
    try:
        for shards in tqdm(args.shards, desc="shard counts"):
            index_dir = random_index(work / f"index-{shards}", n, dim, shards, identity)
            t = time.perf_counter()
            serve.run(build_app({"checkpoint": str(ckpt), "index_dir": str(index_dir), "top_k": args.k,
                                 "shard_autoscaling": {"min_replicas": 1, "max_replicas": 1}}),
                      name="bench", route_prefix="/bench")
            startup = time.perf_counter() - t
            url = f"http://127.0.0.1:{port}/bench/v1/retrieve"
            asyncio.run(closed_loop(url, bodies, 2, 10, 60))  # warm-up
            served = [asyncio.run(closed_loop(url, bodies, c, requests, args.max_seconds))
                      for c in args.concurrency]
            serve.delete("bench")
            base = [baseline(ckpt, index_dir, bodies, requests, c) for c in args.concurrency]
            runs.append({"shards": shards, "startup_s": startup, "serve": served, "baseline": base})
            shutil.rmtree(index_dir)
            print(json.dumps(runs[-1]))
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {"config": {"model": model, "dim": dim, "vectors": n, "kind": "flat", "k": args.k,
                         "concurrency": args.concurrency, "requests": requests, "ray_cpus": args.ray_cpus,
                         "threads_per_replica": 1, "shard_replicas": 1},
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}",
              "command": "python bench/serve_bench.py " + " ".join(sys.argv[1:]), "runs": runs}
    write_report(result, out)
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
