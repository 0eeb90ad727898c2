"""CPU cost figures, measured in one run: prompt tuning vs full fine-tuning, and Ray Train's overhead.

1. Step time and peak memory of a DialCLIP step against a full fine-tuning step (same backbone,
   batch and inputs; each in its own subprocess so peak RSS is its own).
2. Ray Train's overhead: the same training epoch run by ``TorchTrainer`` (1 worker) and by a plain
   PyTorch loop over the same loaders; ratios of in-loop time and of end-to-end wall time.
Writes bench/results/cost_bench.json.   python bench/cost_bench.py [--backbone dialclip-tiny] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
RESULTS = Path(__file__).parent / "results"


def step_cost(variant: str, backbone: str, batch: int, steps: int) -> dict:
    """Run in a child process: time `steps` optimisation steps, report peak RSS."""
    from dialclip_ray.model.backbone import load_backbone
    from dialclip_ray.model.config import BackboneConfig, preset
    from dialclip_ray.pipelines.costs import synthetic_batch, time_steps
    from dialclip_ray.model.dialclip import build_model

    import torch

    torch.set_num_threads(2)
    bb = load_backbone(backbone)
    model, _ = build_model(preset(variant, backbone=BackboneConfig(model_name=backbone)), backbone=bb)
    res = time_steps(model, synthetic_batch(bb.tokenizer, batch, bb.image_size), steps=steps, warmup=2)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def ray_overhead(corpus_cache: Path, epochs_examples: int) -> dict:
    from dialclip_ray.model.config import BackboneConfig
    from dialclip_ray.data.dataset import ReaderConfig
    from dialclip_ray.pipelines.experiments import ensure_corpus, variant_config
    from dialclip_ray.model.dialclip import build_model
    from dialclip_ray.train.loop import build_loaders
    from dialclip_ray.train.run import run_training

    import torch

    corpus = ensure_corpus(corpus_cache, 200, image_size=64)
    cfg = variant_config("dialclip", corpus, BackboneConfig(model_name="dialclip-tiny"),
                         corpus_cache / "cost_runs", epochs=1, workers=1, max_train_examples=epochs_examples,
                         max_val_examples=8)
    cfg.run.name += f"-{int(time.time())}"
    cfg.run.threads_per_worker = 2
    t0 = time.time()
    outcome = run_training(cfg)
    ray_wall = time.time() - t0
    ray_loop = outcome.history[-1]["epoch_seconds"]

    torch.set_num_threads(2)
    model, bb = build_model(cfg.model, seed=cfg.run.seed)
    loaders = build_loaders(cfg, bb, ReaderConfig.from_model_config(cfg.model), lambda dl: dl)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr)
    model.train()
    t0 = time.time()
    steps = 0
    for dl in loaders:
        for batch in dl:
            loss = model(batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    plain = time.time() - t0
    return {"steps": steps, "plain_loop_s": plain, "ray_train_loop_s": ray_loop, "ray_train_fit_wall_s": ray_wall,
            "ratio_loop_ray_over_plain": ray_loop / plain, "ratio_wall_ray_over_plain": ray_wall / plain}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="dialclip-tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cache", default="runs/cache")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(step_cost(args.child, args.backbone, args.batch, args.steps)))
        return
    out = {"backbone": args.backbone, "batch": args.batch, "device": "cpu", "cores": os.cpu_count()}
    for variant in ("default", "finetune"):
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--backbone", args.backbone,
                               "--batch", str(args.batch), "--steps", str(args.steps)],
                              capture_output=True, text=True, check=True)
        out["dialclip" if variant == "default" else "finetune"] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["ratio_step_time_dialclip_over_finetune"] = out["dialclip"]["step_ms"] / out["finetune"]["step_ms"]
    out["ratio_peak_rss_dialclip_over_finetune"] = out["dialclip"]["peak_rss_mb"] / out["finetune"]["peak_rss_mb"]
    out["ray_train"] = ray_overhead(Path(args.cache).resolve(), 64)
    out["command"] = "python bench/cost_bench.py " + " ".join(sys.argv[1:])
    (RESULTS / "cost_bench.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
