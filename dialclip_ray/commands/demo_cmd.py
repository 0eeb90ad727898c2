"""``dialclip demo``: the whole pipeline on synthetic data (see dialclip_ray/demo.py)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on the built-in synthetic data")
    p.add_argument("--keep-serving", action="store_true", help="leave the endpoint up at the end")
    p.add_argument("--tiny", action="store_true", help="a seconds-scale configuration (used by the tests)")
    p.add_argument("--dialogs", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--cache", default=None)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from dialclip_ray.pipelines.demo import TINY, DemoConfig, run_demo

    given = {k: v for k, v in {"dialogs": args.dialogs, "epochs": args.epochs, "port": args.port,
                               "out": args.out, "cache": args.cache}.items() if v is not None}
    cfg = DemoConfig(**{**(TINY if args.tiny else {}), **given, "keep_serving": args.keep_serving})
    run_demo(cfg)
    return 0
