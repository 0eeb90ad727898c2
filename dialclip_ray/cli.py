"""The ``dialclip`` console command.

Each command group lives in its own module with a ``register(subparsers)``
function that adds its parser and sets ``func``; importing them lazily keeps
``dialclip --help`` fast and lets a group fail to import without breaking the rest.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command group -> module defining register(subparsers)
COMMANDS: dict[str, str] = {
    "model": "dialclip_ray.commands.model_cmd",
    "weights": "dialclip_ray.commands.weights_cmd",
    "data": "dialclip_ray.commands.data_cmd",
    "features": "dialclip_ray.commands.features_cmd",
    "pretrain": "dialclip_ray.commands.pretrain_cmd",
    "train": "dialclip_ray.commands.train_cmd",
    "evaluate": "dialclip_ray.commands.evaluate_cmd",
    "index": "dialclip_ray.commands.index_cmd",
    "serve": "dialclip_ray.commands.serve_cmd",
    "query": "dialclip_ray.commands.query_cmd",
    "tune": "dialclip_ray.commands.tune_cmd",
    "demo": "dialclip_ray.commands.demo_cmd",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dialclip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        if only and name != only:
            sub.add_parser(name, help=f"({name})")
            continue
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("dialclip_ray"):
                continue  # group not built yet
            raise
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the group being run: `dialclip data ...` should not import Ray Serve.
    only = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(only).parse_args(argv)
    from dialclip_ray.jobpaths import arg_problems

    problems = arg_problems(args)  # inside a Ray job: paths the job cannot see, refused with the reason
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
