"""The synthetic benchmark: DialCLIP vs zero-shot CLIP, full fine-tuning and three ablations.

Same corpus, same locally pretrained small CLIP, same epochs and seed for every
variant; each is trained with Ray Train and scored on the test splits (PhotoChat
protocol: all 1,000 test photos; MMDialog protocol: 999 negatives + target).
Writes bench/results/synthetic_benchmark.{json,md,png}.

    python bench/synthetic_benchmark.py [--dialogs 10000] [--epochs 4] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from dialclip_ray.model.checkpoint import load_checkpoint  # noqa: E402
from dialclip_ray.model.config import BackboneConfig  # noqa: E402
from dialclip_ray.data.dataset import CanonicalDataset  # noqa: E402
from dialclip_ray.evaluation.local import evaluate_model  # noqa: E402
from dialclip_ray.pipelines.experiments import VARIANTS, ensure_corpus, ensure_small_clip, variant_config  # noqa: E402
from dialclip_ray.train.run import run_training  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dialogs", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--pretrain-epochs", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-train", type=int, default=None, help="cap training examples per dataset and type")
    ap.add_argument("--cache", default="runs/cache")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=str(RESULTS / "synthetic_benchmark"))
    args = ap.parse_args()

    cache = Path(args.cache)
    corpus = ensure_corpus(cache, args.dialogs)
    clip = ensure_small_clip(corpus, cache, epochs=args.pretrain_epochs)
    backbone = BackboneConfig(model_name="dialclip-tiny", pretrained=str(clip.path))
    rows = {}
    for variant in args.variants.split(","):
        cfg = variant_config(variant, corpus, backbone, cache / "bench_runs", args.epochs, args.workers,
                             max_train_examples=args.max_train)
        t0 = time.time()
        outcome = run_training(cfg)
        train_s = time.time() - t0
        model, bb, meta = load_checkpoint(outcome.best)
        scores = {}
        for name, path in (("photochat", corpus.photochat), ("mmdialog", corpus.mmdialog)):
            res = evaluate_model(model, bb, CanonicalDataset.load(path), "test", batch_size=128)
            scores.update({f"{name}/{rtype}": m for rtype, m in res["per_type"].items()})
        last = outcome.history[-1] if outcome.history else {}
        rows[variant] = {"scores": scores, "trainable_params": meta["params"]["trainable"],
                         "trainable_percent": meta["params"]["percent"], "train_seconds": train_s,
                         "peak_rss_mb": last.get("peak_rss_mb"), "best_epoch": meta["extra"].get("epoch"),
                         "history": outcome.history, "run": str(outcome.run_dir)}
        print(variant, {k: round(v["Sum"], 2) for k, v in scores.items()}, f"{train_s:.0f}s", flush=True)
    report = {"dialogs": args.dialogs, "epochs": args.epochs, "workers": args.workers,
              "pretrained_clip": {"path": str(clip.path), "metrics": clip.meta.get("metrics")},
              "variants": rows, "command": "python bench/synthetic_benchmark.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "cache"))}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    bar_chart(report, out.with_suffix(".png"))
    print(markdown(report))


def markdown(report: dict) -> str:
    tasks = sorted({t for r in report["variants"].values() for t in r["scores"]})
    head = "| variant | " + " | ".join(f"{t} R@1 / Sum" for t in tasks) + " | trainable | % | train s |"
    lines = [head, "|---|" + "---:|" * (len(tasks) + 3)]
    for name, r in report["variants"].items():
        cells = [f"{r['scores'][t]['R@1']:.1f} / {r['scores'][t]['Sum']:.1f}" if t in r["scores"] else "-"
                 for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {r['trainable_params']:,} | {r['trainable_percent']:.3f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines) + f"\n\n{report['dialogs']} dialogs, {report['epochs']} epochs, " \
                              f"{report['workers']} Ray Train workers. `{report['command']}`\n"


def bar_chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(report["variants"])
    tasks = sorted({t for r in report["variants"].values() for t in r["scores"]})
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(1, len(tasks))
    for i, task in enumerate(tasks):
        vals = [report["variants"][n]["scores"].get(task, {}).get("Sum", 0) for n in names]
        ax.bar(np.arange(len(names)) + i * width, vals, width, label=task)
    ax.set_xticks(np.arange(len(names)) + width * (len(tasks) - 1) / 2, names)
    ax.set_ylabel("Sum = R@1 + R@5 + R@10 (test)")
    ax.set_title("Synthetic benchmark")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
