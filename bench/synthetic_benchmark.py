"""The synthetic benchmark: does prompt tuning beat the CLIP we already have? With confidence intervals.

Variants are the model presets of the same name: default (the product: gated prompts), ungated (the
paper's form), paper-budget, zeroshot, finetune, and the three ablations of the default no-context,
no-domain, single-expert. Every variant gets the same corpus, the same shipped stand-in CLIP
(``dialclip-small`` + ``"synthetic"``, model/standin.py), the same learning-rate grid on the same
proxy budget, and the same training budget; each is scored on every test query, and differences
are tested pairwise on the same queries. The reusable parts live in
``dialclip_ray.pipelines.benchmark``; this file only wires the stages:

  [1] corpus      generate + prepare at the real protocols' sizes (BENCH_CORPUS)
  [2] backbone    the shipped stand-in (``--pretrain-backbone``: pretrain BACKBONE on this corpus instead)
  [3] features    the frozen feature store of each dataset (context turn and image embeddings)
  [4] lr          one Ray Tune grid sweep over (variant, lr): a proxy run per point (2 epochs, 206
                  optimizer steps, 20 warmup, 510 validation queries, epoch 0 validated), best Sum wins
  [5] train+rank  per variant and seed: train until validation stops improving (patience 2; the
                  best-validation epoch, epoch 0 included, is kept), then rank every test query
  [6] results     bootstrap statistics -> bench/results/synthetic_benchmark.{json,md,png}

The measured stage times of the reported run are in the results file (``protocol.stage_seconds``)
and in docs/results.md. ``--quick`` runs every stage on a tiny corpus (1 epoch, 1 seed, a two-point
grid) to prove the pipeline; it writes ``synthetic_benchmark_quick.*``.

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
HEADLINE = ("default", "ungated", "finetune")  # --seeds seeds each; the others --ablation-seeds
ALL = ("zeroshot", "finetune", "default", "ungated", "paper-budget", "no-context", "no-domain", "single-expert")


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
    ap.add_argument("--proxy-train", type=int, default=2200,
                    help="proxy runs: training examples per dataset and type (2 epochs of 3 x 2,200 at a global "
                         "batch of 64: 206 optimizer steps, 20 of them warmup)")
    ap.add_argument("--proxy-val", type=int, default=170,
                    help="proxy runs: validation queries per dataset and type (3 tasks: 510 in all)")
    ap.add_argument("--proxy-epochs", type=int, default=2)
    ap.add_argument("--features", default="auto", choices=("auto", "require", "off"),
                    help="frozen feature store mode for ranking")
    ap.add_argument("--max-text-queries", type=int, default=None,
                    help="rank only the MMDialog text targets of the first test conversations holding this many "
                         "(whole conversations; default: all 8,238): the lever when time is short")
    ap.add_argument("--pretrain-backbone", action="store_true",
                    help="pretrain a small CLIP on this corpus's captions (BACKBONE) instead of the shipped stand-in")
    ap.add_argument("--cache", default="runs/cache")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.ablation_seeds, args.proxy_epochs = 1, 1, 1, 1
        args.max_train, args.max_val, args.proxy_train, args.proxy_val = 48, 32, 24, 24
        args.batch_size = 8  # per worker: 24-48 examples per type still make whole batches
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
    backbone_spec = B.QUICK_BACKBONE if args.quick else B.BACKBONE  # with --pretrain-backbone
    progress = Stages(6)
    load_start = os.getloadavg()

    progress("corpus: generate + prepare " + json.dumps({k: v for k, v in corpus_spec.items() if k != "dialogs"}))
    spec = dict(corpus_spec)
    if args.pretrain_backbone and not args.quick:
        spec["caption_images"] = B.PRETRAIN_CAPTION_IMAGES
    corpus = ensure_corpus(cache, spec.pop("dialogs"), 0, 64, **spec)
    counts = json.loads((corpus.raw / "synth_meta.json").read_text())["counts"]

    if args.pretrain_backbone:
        progress(f"backbone: pretrain {backbone_spec['model_name']} on the corpus captions (Ray Train)")
        clip = ensure_small_clip(corpus, cache, workers=args.workers, **backbone_spec)
        backbone = BackboneConfig(model_name=backbone_spec["model_name"], pretrained=str(clip.path))
        facts = B.backbone_facts(clip)
    else:
        progress("backbone: the shipped stand-in CLIP (dialclip-small + 'synthetic', model/standin.py)")
        backbone = BackboneConfig(model_name=B.STANDIN_BACKBONE[0], pretrained=B.STANDIN_BACKBONE[1])
        facts = B.standin_facts(corpus)
    print(f"    held-out caption->image R@1 {facts['heldout_caption_to_image_R@1']:.1f}% among "
          f"{facts['heldout_pool']} photos", flush=True)

    def make_config(variant: str, lr: float, proxy: bool = False, seed: int = 0):
        return variant_config(
            variant, corpus, backbone, cache / ("bench_lr" if proxy else "bench_runs"),
            args.proxy_epochs if proxy else args.epochs, args.workers, seed=seed, batch_size=args.batch_size,
            lr=lr, finetune_lr=lr / 20, max_train_examples=args.proxy_train if proxy else args.max_train,
            max_val_examples=args.proxy_val if proxy else args.max_val, patience=None if proxy else args.patience,
            validate_at_start=proxy or args.validate_at_start)

    progress("features: the frozen feature store of each dataset for this backbone (context turns, images)")
    from dialclip_ray.features.build import ensure_store

    for path in (corpus.photochat, corpus.mmdialog):
        ensure_store(path, make_config("default", grid[0]).model, args.features)

    progress(f"lr: one Ray Tune sweep, {len(grid)}-point grid {grid} x every trained variant, proxy "
             f"{args.proxy_epochs} epoch(s) on {args.proxy_train} examples per dataset and type")
    trained = [v for v in variants if v != "zeroshot"]
    lrs = B.select_lrs(trained, make_config, grid, cache / "bench_lr_sweep", log=lambda s: print(s, flush=True)) \
        if trained else {}

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
            pc_image = runs.ranks[(v, "photochat", "dialog_to_image")][seed]
            attributes = B.attribute_agreement(corpus.raw / "synth_truth.json", pc_image)
            runs.runs.setdefault(v, {})[seed] = {"photochat_top1_attributes": attributes,
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
                         "proxy_val": args.proxy_val, "proxy_validate_at_start": True,
                         "score": "best validation Sum after epoch 0 (epoch 0 recorded beside it)",
                         "warmup_steps": make_config("default", grid[0]).optim.warmup_steps,
                         "how": "one Ray Tune grid sweep over (variant, lr), one trial at a time",
                         "finetune_backbone_lr": "lr / 20", "chosen": lrs},
        "corpus": {"dir": B.rel(corpus.raw.parent), "dialogs": corpus_spec["dialogs"], **spec, "counts": counts},
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
