"""``dialclip train``: prompt tuning (or a baseline) as a Ray Train job."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training config YAML (see configs/)")
    p.add_argument("--workers", type=int, default=None, help="data-parallel workers (overrides run.workers)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL, mixed precision")
    p.add_argument("--run-name", default=None, help="rerunning a name resumes it (overrides run.name)")
    p.add_argument("--storage", default=None, help="where runs live (overrides run.storage_path)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--pretrained", default=None, help="backbone weights: open_clip tag or local path")
    p.add_argument("--allow-config-change", action="store_true",
                   help="continue a run whose recorded config differs (the change is recorded in the run); "
                        "without it such a rerun is refused with the differing fields")
    p.add_argument("--data", action="append", default=None,
                   help="prepared dataset directory; repeat for several (overrides data.train)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="prompt-tune DialCLIP (or train a baseline) with Ray Train")
    add_arguments(p)
    p.set_defaults(func=main)


def overrides_from(args: argparse.Namespace) -> dict:
    pairs = {"run.workers": args.workers, "run.name": args.run_name, "run.storage_path": args.storage,
             "optim.epochs": args.epochs, "model.backbone.pretrained": args.pretrained, "data.train": args.data}
    out = {k: v for k, v in pairs.items() if v is not None}
    if args.gpu:
        out["run.use_gpu"] = True
    return out


def main(args: argparse.Namespace) -> int:
    from dialclip_ray.train.config import ConfigError, load_train_config
    from dialclip_ray.train.run import run_training

    try:
        cfg = load_train_config(args.config, overrides_from(args))
    except ConfigError as exc:
        print(f"error: {exc}")
        return 2
    from dialclip_ray.jobpaths import config_problems, is_local_path

    problems = config_problems(cfg, args.config, check_storage=args.storage is None)  # inside a Ray job only
    weights = cfg.model.backbone.pretrained
    if weights and is_local_path(weights, "pretrained") and not Path(weights).expanduser().exists():
        problems.append(f"{args.config}: model.backbone.pretrained: '{weights}' does not exist (relative paths "
                        f"start at {Path.cwd()}); configs/synthetic*.yaml use the shipped stand-in (pretrained: synthetic)")
    if problems:
        for problem in dict.fromkeys(problems):
            print(f"error: {problem}")
        return 2
    from dialclip_ray.train.run import RunConfigChangedError

    try:
        outcome = run_training(cfg, allow_config_change=args.allow_config_change)
    except RunConfigChangedError as exc:
        print(f"error: {exc}")
        return 2
    print(f"run: {outcome.run_dir} ({'trained' if outcome.trained else 'already complete, reused'})")
    print(f"best checkpoint: {outcome.best}  val_sum={outcome.best_metrics.get('val_sum', float('nan')):.2f}")
    print(f"curves: {outcome.run_dir}/training_curves.png (per step: {outcome.run_dir}/steps.csv, tensorboard/)")
    return 0
