"""``dialclip evaluate``: distributed (Ray Data) evaluation of checkpoints on a prepared split."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score checkpoints with Ray Data (R@1/5/10, Sum, MRR)")
    p.add_argument("--checkpoint", action="append", required=True,
                   help="NAME=PATH or PATH (local or s3://, gs://) of a training run dir (its best/) or a DialCLIP "
                        "checkpoint dir; "
                        "repeat to compare models")
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default=None, help="write eval.json and eval.md here (a directory or s3://, gs:// URI)")
    p.add_argument("--actors", type=int, default=2, help="encoder actors in the Ray Data pool")
    p.add_argument("--gpus-per-actor", type=float, default=0.0,
                   help="GPUs each encoder actor requests (1, or 0.5 to share a card; 0 = CPU actors)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--local", action="store_true", help="single process, no Ray (the reference path)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from dialclip_ray.pipelines.evaluate import evaluate_checkpoints, parse_named
    from dialclip_ray.rundir import RunDirError, resolve_checkpoint

    try:
        checkpoints = {name: str(resolve_checkpoint(path)) for name, path in parse_named(args.checkpoint).items()}
    except RunDirError as exc:
        print(f"error: {exc}")
        return 2
    report = evaluate_checkpoints(checkpoints, args.data, args.split, args.out,
                                  distributed=not args.local, actors=args.actors, batch_size=args.batch_size,
                                  max_examples=args.max_examples, compare=not args.local,
                                  gpus_per_actor=args.gpus_per_actor)
    print(report["table"])
    if report.get("comparison_table"):
        print("\npaired differences, first model minus each other (95% bootstrap CI over the same queries):")
        print(report["comparison_table"])
    return 0
