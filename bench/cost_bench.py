"""CPU cost figures, measured in one run: prompt tuning vs full fine-tuning, and Ray Train's overhead.

1. Step time and peak memory of a DialCLIP step against a full fine-tuning step: same backbone,
   batch, inputs and precision; each variant in its own subprocess so its peak RSS is its own.
   DialCLIP is timed as it trains from the first epoch on (context features read from the frozen
   feature store) and, for reference, in the paper's form (the towers re-run over every context
   turn and image at every step: what the store removes).
2. The feature store's build time for the benchmark corpus: a one-off cost per dataset and backbone.
3. Ray Train's overhead: the same steps run by ``TorchTrainer`` (1 worker) and by a plain PyTorch
   loop over the same loaders (median step time, steady state), plus the start-up from ``fit()``
   to the first step, split into its parts.

Writes bench/results/cost_bench.json (``step_time_ratio`` and ``peak_memory_ratio`` =
DialCLIP with the store / full fine-tuning, per backbone).

    python bench/cost_bench.py                 # dialclip-tiny batch 32 and ViT-B-32 batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("dialclip_store", "dialclip_towers", "finetune")


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def step_cost(variant: str, backbone: str, batch: int, steps: int) -> dict:
    """Run in a child process: time ``steps`` optimisation steps; report peak RSS and its training share."""
    import torch

    from dialclip_ray.model.backbone import load_backbone
    from dialclip_ray.model.config import BackboneConfig, preset
    from dialclip_ray.model.dialclip import build_model
    from dialclip_ray.pipelines.costs import synthetic_batch, time_steps

    torch.set_num_threads(2)
    bb = load_backbone(backbone)
    cfg = preset("finetune" if variant == "finetune" else "default", backbone=BackboneConfig(model_name=backbone))
    model, _ = build_model(cfg, backbone=bb)
    dim = int(bb.model.text_projection.shape[-1])
    data = synthetic_batch(bb.tokenizer, batch, bb.image_size, feature_dim=dim if variant == "dialclip_store" else None)
    before = _rss_mb()
    res = time_steps(model, data, steps=steps, warmup=2)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["rss_before_steps_mb"] = before
    res["training_rss_increase_mb"] = res["peak_rss_mb"] - before
    return res


def step_costs(backbone: str, batch: int, steps: int) -> dict:
    out: dict = {"backbone": backbone, "batch": batch, "precision": "fp32", "steps": steps}
    for variant in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--backbone", backbone,
                               "--batch", str(batch), "--steps", str(steps)],
                              capture_output=True, text=True, check=True)
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(backbone, variant, f"{out[variant]['step_ms']:.0f} ms/step, peak {out[variant]['peak_rss_mb']:.0f} MB",
              flush=True)
    ft = out["finetune"]
    out["step_time_ratio"] = out["dialclip_store"]["step_ms"] / ft["step_ms"]
    out["peak_memory_ratio"] = out["dialclip_store"]["peak_rss_mb"] / ft["peak_rss_mb"]
    out["training_memory_ratio"] = (out["dialclip_store"]["training_rss_increase_mb"]
                                    / ft["training_rss_increase_mb"])
    out["step_time_ratio_without_store"] = out["dialclip_towers"]["step_ms"] / ft["step_ms"]
    return out


def feature_store_build(corpus) -> dict:
    from dialclip_ray.features.build import build_feature_store
    from dialclip_ray.features.store import check_store

    result = {}
    for name, directory in (("photochat", corpus.photochat), ("mmdialog", corpus.mmdialog)):
        t0 = time.time()
        path = build_feature_store(directory, "dialclip-tiny", None, actors=2, force=True)
        info = check_store(path)
        result[name] = {"seconds": round(time.time() - t0, 2), "turns": info["turns"], "images": info["images"],
                        "dim": info["dim"]}
    return result


def plain_loop(cfg, steps: int) -> dict:
    """The worker loop's steps without Ray: same model, loaders, optimiser step and feature store."""
    import torch

    from dialclip_ray.data.dataset import ReaderConfig
    from dialclip_ray.features.store import open_for_model
    from dialclip_ray.model.dialclip import build_model
    from dialclip_ray.runtime import AmpStep
    from dialclip_ray.train.loop import build_loaders

    torch.set_num_threads(cfg.run.threads_per_worker or 2)
    t0 = time.time()
    model, bb = build_model(cfg.model, seed=cfg.run.seed)
    stores = {p: open_for_model(p, model, cfg.data.features) for p in cfg.data.train}
    loaders = build_loaders(cfg, bb, ReaderConfig.from_model_config(cfg.model), lambda dl: dl, stores)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr)
    step = AmpStep(torch.device("cpu"), "none", params, cfg.optim.grad_clip)
    setup_s = time.time() - t0
    model.train()
    times = []
    for dl in loaders:
        for batch in dl:
            t1 = time.perf_counter()
            step.backward_and_step(model(batch)["loss"], opt)
            times.append(time.perf_counter() - t1)
            if len(times) >= steps:
                break
    return {"steps": len(times), "setup_s": setup_s, "step_ms_median": 1000 * statistics.median(times[1:]),
            "first_step_ms": 1000 * times[0]}


def ray_overhead(cache: Path, steps: int) -> dict:
    from dialclip_ray.model.config import BackboneConfig
    from dialclip_ray.pipelines.experiments import ensure_corpus, variant_config
    from dialclip_ray.runtime import ensure_ray
    from dialclip_ray.train.run import run_training

    corpus = ensure_corpus(cache, 200, image_size=64)
    cfg = variant_config("default", corpus, BackboneConfig(model_name="dialclip-tiny"), cache / "cost_runs",
                         epochs=1, workers=1, max_train_examples=steps * 16, max_val_examples=8)
    cfg.optim.batch_size = 16
    cfg.run.name += f"-{int(time.time())}"
    cfg.run.threads_per_worker = 2
    t0 = time.time()
    ensure_ray()
    ray_init_s = time.time() - t0
    outcome = run_training(cfg)
    wall = time.time() - t0
    last = outcome.history[-1]
    plain = plain_loop(cfg, steps)
    ray_step = last.get("step_ms_median")
    return {"steps": last.get("step"), "ray_init_s": ray_init_s, "run_training_wall_s": wall,
            "startup_to_first_step_s": last.get("startup_s"), "worker_setup_s": last.get("setup_s"),
            "ray_step_ms_median": ray_step, "plain": plain,
            "per_step_ratio": (ray_step / plain["step_ms_median"]) if ray_step else None,
            "corpus": str(Path(corpus.photochat).relative_to(REPO)) if Path(corpus.photochat).is_relative_to(REPO)
            else Path(corpus.photochat).name}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", action="append", help="backbone:batch (repeatable)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--ray-steps", type=int, default=20)
    ap.add_argument("--cache", default="runs/cache")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(step_cost(args.child, args.backbone[0], args.batch, args.steps)))
        return
    from dialclip_ray.pipelines.experiments import ensure_corpus

    specs = args.backbone or ["dialclip-tiny:32", "ViT-B-32:8"]
    out: dict = {"device": "cpu", "cores": os.cpu_count(), "command": "python bench/cost_bench.py "
                 + " ".join(sys.argv[1:]), "backbones": {}}
    for spec in specs:
        name, _, batch = spec.partition(":")
        out["backbones"][name] = step_costs(name, int(batch or 32), args.steps)
    first = out["backbones"][specs[0].partition(":")[0]]
    out["step_time_ratio"] = first["step_time_ratio"]
    out["peak_memory_ratio"] = first["peak_memory_ratio"]
    cache = Path(args.cache).resolve()
    out["feature_store_build"] = feature_store_build(ensure_corpus(cache, 200, image_size=64))
    out["ray_train"] = ray_overhead(cache, args.ray_steps)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cost_bench.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
