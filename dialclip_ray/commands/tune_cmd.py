"""``dialclip tune``: a Ray Tune sweep over prompt lengths, insertion layer, experts and learning rate."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="hyperparameter sweep with Ray Tune (ASHA on validation Sum)")
    p.add_argument("--space", required=True, help="search space YAML (see tune/)")
    p.add_argument("--samples", type=int, default=None, help="trials (overrides the file's `samples`)")
    p.add_argument("--gpu", dest="use_gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="trials' Train workers take one GPU each (--no-gpu: CPU); default: the base config's "
                        "run.use_gpu. A trial's own driver never holds a GPU")
    p.add_argument("--cpus-per-trial", type=float, default=0.5, help="for the trial driver; workers add their own")
    p.add_argument("--name", default="sweep", help="rerunning a name resumes the sweep")
    p.add_argument("--storage", default="runs/tune", help="where sweeps live: a shared directory or s3://, gs://")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from dialclip_ray.jobpaths import config_problems, ray_job_id
    from dialclip_ray.tuning.space import SpaceError, load_space
    from dialclip_ray.tuning.sweep import run_sweep

    if ray_job_id() is not None:  # the base config's data and weights must exist where the job runs
        try:
            _, base = load_space(args.space)
        except SpaceError as exc:
            print(f"error: {exc}")
            return 2
        problems = config_problems(base, f"{args.space} (base_config)", check_storage=False)
        if problems:
            for problem in problems:
                print(f"error: {problem}")
            return 2
    try:
        out = run_sweep(args.space, args.name, args.storage, args.samples, args.cpus_per_trial, args.use_gpu)
    except SpaceError as exc:
        print(f"error: {exc}")
        return 2
    from dialclip_ray import storage

    print(storage.read_text(storage.join(out.sweep_dir, "trials.md")))
    print(f"best val Sum {out.best_val_sum:.2f} with {out.best_params}")
    if out.default_val_sum is not None:
        print(f"default config val Sum {out.default_val_sum:.2f} "
              f"(best - default = {out.best_val_sum - out.default_val_sum:+.2f})")
    print(f"best config: {out.best_config_path}  (dialclip train --config {out.best_config_path})")
    print(f"plots: {out.sweep_dir}/sensitivity.png")
    return 0
