"""``dialclip pretrain``: train (or reuse) the small from-scratch CLIP that stands in for OpenAI's weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "dialclip" / "pretrain"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by the CLI group and ``jobs/pretrain_clip.py``."""
    from dialclip_ray.pretrain.config import PretrainConfig

    d = PretrainConfig()
    p.add_argument("--data", required=True, help="synthetic corpus root (holds captions.parquet)")
    p.add_argument("--model", default=d.model_name, help="open_clip model config name")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--workers", type=int, default=d.workers, help="Ray Train workers")
    p.add_argument("--threads-per-worker", type=int, default=None)
    p.add_argument("--augment", action="store_true", help="random-resized-crop augmentation")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--force", action="store_true", help="retrain even if a cached artifact exists")


def config_from_args(args: argparse.Namespace):
    from dialclip_ray.pretrain.config import PretrainConfig

    return PretrainConfig(model_name=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, max_steps=args.max_steps,
                          workers=args.workers, threads_per_worker=args.threads_per_worker, augment=args.augment,
                          use_gpu=args.gpu, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    from dialclip_ray.pretrain.run import run_pretrain

    result = run_pretrain(config_from_args(args), args.data, args.cache_dir, force=args.force)
    m = result.meta["metrics"]
    print(json.dumps({"checkpoint": str(result.path), "cached": result.cached, "key": result.meta["key"],
                      "train_s": result.meta["train_s"], "metrics": m}, indent=2))
    print(f"{result.path}\ncaption->image R@1 {m['caption_to_image_R@1']:.1f}%  "
          f"image->caption R@1 {m['image_to_caption_R@1']:.1f}%  (pool {m['pool_size']}, "
          f"chance {m['chance_R@1']:.2f}%){'  [cached]' if result.cached else ''}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="pretrain a small open_clip CLIP on the synthetic captions (Ray Train)",
                              description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run)
