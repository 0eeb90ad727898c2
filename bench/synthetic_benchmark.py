"""The synthetic benchmark: does prompt tuning beat the CLIP we already have? With confidence intervals.

Variants (model presets of the same name, ``dialclip`` = the default preset): zeroshot, finetune,
dialclip, gated, paper-budget and the ablations no-context, no-domain, single-expert. Every variant
gets the same corpus, the same locally pretrained small CLIP, the same learning-rate grid on the
same proxy budget, and the same training budget; each is scored on every test query, and
differences are tested pairwise on the same queries. The reusable parts live in
``dialclip_ray.pipelines.benchmark``; this file only wires the stages:

  [1] corpus      generate + prepare at the real protocols' sizes (BENCH_CORPUS)
  [2] backbone    pretrain dialclip-small on the corpus captions (cached by config + corpus)
  [3] features    the frozen feature store of each dataset (context turn and image embeddings)
  [4] lr          per trained variant: one proxy run per learning rate of LR_GRID, best validation Sum
  [5] train+rank  per variant and seed: train (best-validation-Sum epoch kept), then rank every test query
  [6] results     bootstrap statistics -> bench/results/synthetic_benchmark.{json,md,png}

Measured time (2 quiet CPU cores, the settings the README reports:
``--epochs 2 --patience 1 --max-train 4000 --max-text-queries 2500``; the target is 100 minutes, and
a run from scratch misses it by about 15-20):

  stage                                           measured
  [1] corpus (4,000/500/1,000 PhotoChat-style      2 min (124 s wall at load 7-10)
      dialogs, 2,800/360/720 MMDialog-style
      conversations, 30,000 caption images)
  [2] backbone (dialclip-small, 922 steps)         11-15 min quiet (31.8 min at load 10-45);
                                                   held-out R@1 49.6% among 1,000 photos
  [3] features: 2 stores for the backbone          4 min
  [4] lr: 7 variants x 3 lrs, 1 epoch on 600       25 min (21 proxy runs of 46-82 s, Ray Train
      examples per dataset and type                start-up included)
  [5] train: 13 runs (dialclip, gated, finetune    62 min (2.4-6.9 min per run: validation before
      x 3 seeds; 4 variants x 1) + zeroshot        training, then up to 2 epochs of 186 steps, each
                                                   followed by 1,500 validation queries)
      rank: 14 models x 4,514 test queries         10 min (41-49 s per model)
  [6] statistics and files                         7 s
  total from scratch                               about 115-120 min (73 min with stages 1-4 cached)

The defaults (6 epochs x 4,000 examples, every reply query) take about 2.3 min per epoch and
4+ hours in all: they are the protocol for a bigger machine.

``--quick`` runs every stage on a tiny corpus (dialclip-micro backbone, 1 epoch, 1 seed, a
two-point grid) to prove the pipeline; it writes ``synthetic_benchmark_quick.*``.

    python bench/synthetic_benchmark.py [--quick] [--epochs 6] [--seeds 3] [--ablation-seeds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from dialclip_ray.model.config import BackboneConfig
from dialclip_ray.pipelines import benchmark as B
from dialclip_ray.pipelines.experiments import ensure_corpus, ensure_small_clip, variant_config
from dialclip_ray.pipelines.stages import Stages

RESULTS = Path(__file__).resolve().parent / "results"
HEADLINE = ("zeroshot", "finetune", "dialclip", "gated")  # --seeds seeds each; the others --ablation-seeds
ALL = ("zeroshot", "finetune", "dialclip", "gated", "paper-budget", "no-context", "no-domain", "single-expert")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 epoch, 1 seed: proves the pipeline")
    ap.add_argument("--variants", default=",".join(ALL))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=3, help=f"seeds for {', '.join(HEADLINE)}")
    ap.add_argument("--ablation-seeds", type=int, default=1)
    ap.add_argument("--max-train", type=int, default=4000, help="training examples per dataset and type")
    ap.add_argument("--max-val", type=int, default=500, help="validation queries per dataset and type (selection)")
    ap.add_argument("--patience", type=int, default=2,
                    help="early stopping: epochs without a better validation Sum before a run ends")
    ap.add_argument("--validate-at-start", action=argparse.BooleanOptionalAction, default=True,
                    help="every trained run also validates its starting point (epoch 0), a candidate for "
                         "its best checkpoint (proxy runs do not: their start does not depend on the lr)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lr-grid", default=",".join(f"{x:g}" for x in B.LR_GRID))
    ap.add_argument("--proxy-train", type=int, default=600, help="proxy runs: training examples per dataset/type")
    ap.add_argument("--proxy-val", type=int, default=200)
    ap.add_argument("--proxy-epochs", type=int, default=1)
    ap.add_argument("--features", default="auto", choices=("auto", "require", "off"),
                    help="frozen feature store mode for ranking")
    ap.add_argument("--max-text-queries", type=int, default=None,
                    help="rank only the MMDialog text targets of the first test conversations holding this many "
                         "(whole conversations; default: all 8,238): the lever when time is short")
    ap.add_argument("--cache", default="runs/cache")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.ablation_seeds = 1, 1, 1
        args.max_train, args.max_val, args.proxy_train, args.proxy_val = 48, 32, 24, 24
        args.lr_grid = "0.002,0.005"
    args.out = args.out or str(RESULTS / ("synthetic_benchmark_quick" if args.quick else "synthetic_benchmark"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:  # a missing preset is a clear error now, not after an hour of training
        B.check_variant(v)
    grid = [float(x) for x in args.lr_grid.split(",")]
    cache = Path(args.cache)
    corpus_spec = B.QUICK_CORPUS if args.quick else B.BENCH_CORPUS
    backbone_spec = B.QUICK_BACKBONE if args.quick else B.BACKBONE
    progress = Stages(6)
    load_start = os.getloadavg()

    progress("corpus: generate + prepare " + json.dumps({k: v for k, v in corpus_spec.items() if k != "dialogs"}))
    spec = dict(corpus_spec)
    corpus = ensure_corpus(cache, spec.pop("dialogs"), 0, 64, **spec)
    counts = json.loads((corpus.raw / "synth_meta.json").read_text())["counts"]

    progress(f"backbone: pretrain {backbone_spec['model_name']} on the corpus captions (Ray Train)")
    clip = ensure_small_clip(corpus, cache, workers=args.workers, **backbone_spec)
    backbone = BackboneConfig(model_name=backbone_spec["model_name"], pretrained=str(clip.path))
    facts = B.backbone_facts(clip)
    print(f"    {'reused' if clip.cached else 'trained'}: held-out caption->image R@1 "
          f"{facts['heldout_caption_to_image_R@1']:.1f}% among {facts['heldout_pool']} photos", flush=True)

    def make_config(variant: str, lr: float, proxy: bool = False, seed: int = 0):
        return variant_config(
            variant, corpus, backbone, cache / ("bench_lr" if proxy else "bench_runs"),
            args.proxy_epochs if proxy else args.epochs, args.workers, seed=seed, batch_size=args.batch_size,
            lr=lr, finetune_lr=lr / 20, max_train_examples=args.proxy_train if proxy else args.max_train,
            max_val_examples=args.proxy_val if proxy else args.max_val, patience=None if proxy else args.patience,
            validate_at_start=not proxy and args.validate_at_start)

    progress("features: the frozen feature store of each dataset for this backbone (context turns, images)")
    from dialclip_ray.features.build import ensure_store

    for path in (corpus.photochat, corpus.mmdialog):
        ensure_store(path, make_config("dialclip", grid[0]).model, args.features)

    progress(f"lr: {len(grid)}-point grid {grid} per trained variant, proxy {args.proxy_epochs} epoch(s) on "
             f"{args.proxy_train} examples per dataset and type")
    lrs = {}
    for v in variants:
        if v != "zeroshot":
            lrs[v] = B.select_lr(v, make_config, grid, log=lambda s: print(s, flush=True))

    progress("train + rank: " + ", ".join(f"{v} x {seeds_of(v, args)}" for v in variants))
    from dialclip_ray.model.checkpoint import load_checkpoint
    from dialclip_ray.train.run import run_training

    runs = B.BenchmarkRuns()
    seeds_used = {}
    for v in variants:
        seeds_used[v] = list(range(seeds_of(v, args)))
        for seed in seeds_used[v]:
            lr = lrs.get(v, {}).get("lr", grid[len(grid) // 2])
            outcome = run_training(make_config(v, lr, seed=seed))
            t0 = time.time()
            model, bb, meta = load_checkpoint(outcome.best)
            for name, path in (("photochat", corpus.photochat), ("mmdialog", corpus.mmdialog)):
                runs.add(v, seed, name, B.rank_queries(model, bb, path, "test", features=args.features,
                                                       max_queries={"text": args.max_text_queries}))
            rank_s = time.time() - t0
            runs.runs.setdefault(v, {})[seed] = {
                "lr": lr, "trainable_params": meta["params"]["trainable"],
                "trainable_percent": meta["params"]["percent"], "best_epoch": meta["extra"].get("epoch"),
                "val_sum": outcome.best_metrics.get("val_sum"), "train_seconds": round(outcome.wall_seconds, 1),
                "rank_seconds": round(rank_s, 1), "run": B.rel(outcome.run_dir)}
            sums = {f"{d}/{t}": round(float(B.stats.per_query_metrics(q[seed].ranks)["Sum"].mean()), 1)
                    for (vv, d, t), q in runs.ranks.items() if vv == v}
            print(f"    {v} seed {seed}: lr {lr:g}, best epoch {meta['extra'].get('epoch')}, test Sum {sums} "
                  f"(train {outcome.wall_seconds:.0f}s, rank {rank_s:.0f}s)", flush=True)

    progress("results: bootstrap statistics and files")
    command = "python bench/synthetic_benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    protocol = {
        "command": command.strip(), "quick": args.quick, "seeds": seeds_used,
        "note_seeds": "zeroshot trains nothing and ranks deterministically: one seed is the whole distribution",
        "epochs": args.epochs, "selection": "checkpoint of the epoch with the best validation Sum (mean over types)"
                     + (", epoch 0 (the model as built) included" if args.validate_at_start else "")
                     + f"; early stopping after {args.patience} epochs without a better one",
        "patience": args.patience, "validate_at_start": args.validate_at_start,
        "max_train_examples_per_dataset_and_type": args.max_train, "max_val_examples": args.max_val,
        "batch_size": args.batch_size, "workers": args.workers, "max_text_queries": args.max_text_queries,
        "lr_selection": {"grid": grid, "proxy_epochs": args.proxy_epochs, "proxy_train": args.proxy_train,
                         "proxy_val": args.proxy_val, "finetune_backbone_lr": "lr / 20", "chosen": lrs},
        "corpus": {"dir": B.rel(corpus.raw.parent), **{k: v for k, v in corpus_spec.items()}, "counts": counts},
        "test_protocols": {"photochat": "each test dialog against all test photos",
                           "mmdialog": "each test target against its own 999 negatives + the target"},
        "statistics": {"n_boot": B.stats.N_BOOT, "ci": "95% percentile bootstrap; seeds then queries",
                       "comparisons": "paired bootstrap on the same queries (a - b)"},
        "stage_seconds": dict(progress.seconds),  # stages 1-5; the results stage is printed below
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
    }
    report = B.write_results(args.out, runs, facts, protocol)
    progress.finish()
    print(B.markdown(report))
    print(f"wrote {B.rel(Path(args.out).with_suffix('.json'))} (.md, .png); results stage "
          f"{list(progress.seconds.values())[-1]:.0f}s, total {time.time() - progress.t0:.0f}s")
    return 0


def seeds_of(variant: str, args: argparse.Namespace) -> int:
    if variant == "zeroshot":
        return 1
    return args.seeds if variant in HEADLINE else args.ablation_seeds


if __name__ == "__main__":
    sys.exit(main())
