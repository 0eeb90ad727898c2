"""``dialclip data``: synth | prepare | stats (logic lives in the data modules)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from dialclip_ray.data.errors import DataError

EXIT_DATA_ERROR = 2


def _guard(handler: Callable[[argparse.Namespace], int | None]) -> Callable[[argparse.Namespace], int]:
    """Bad input -> one-line message on stderr and exit code 2, no traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(handler(args) or 0)
        except (DataError, FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as exc:
            print(f"dialclip data {args.data_command}: error: {exc}", file=sys.stderr)
            return EXIT_DATA_ERROR

    return run


def _synth(args: argparse.Namespace) -> int:
    from dialclip_ray.data.synthetic import generate  # lazy: the generator pulls in image rendering

    result = generate(args.out, dialogs=args.dialogs, seed=args.seed, image_size=args.image_size)
    if result is not None:
        print(json.dumps(result, indent=2, default=str) if isinstance(result, dict) else result)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from dialclip_ray.data.prepare import prepare

    meta = prepare(args.format, args.input, args.images, args.out, on_error=args.on_error,
                   image_patterns=args.image_pattern or None, max_pixels=args.max_pixels,
                   progress=not args.quiet, workers=args.workers)
    counts, skipped = meta["counts"], meta["skipped"]
    print(f"wrote {args.out}: {counts['examples']} examples, {counts['images']} images, {counts['texts']} texts; "
          f"skipped {skipped['total']} {skipped['by_reason'] or ''}".rstrip())
    return 0


def _stats(args: argparse.Namespace) -> int:
    import open_clip

    from dialclip_ray.data.stats import dataset_stats, format_stats

    stats = dataset_stats(args.dir, open_clip.get_tokenizer(args.tokenizer), max_examples=args.max_examples,
                          plot=args.plot)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from dialclip_ray.data.images import DEFAULT_MAX_PIXELS

    data = subparsers.add_parser("data", help="make, convert and inspect datasets")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("synth", help="write the synthetic PhotoChat/MMDialog-format corpus")
    p.add_argument("--out", required=True)
    p.add_argument("--dialogs", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.set_defaults(func=_guard(_synth))

    p = sub.add_parser("prepare", help="convert PhotoChat or MMDialog files into a canonical dataset dir")
    p.add_argument("--format", required=True, choices=["photochat", "mmdialog"])
    p.add_argument("--input", required=True, help="a shard file or directory (PhotoChat); root or split dir (MMDialog)")
    p.add_argument("--images", default=None, help="image root (MMDialog default: the input root)")
    p.add_argument("--out", required=True)
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    p.add_argument("--image-pattern", action="append", default=[],
                   help="file name template relative to --images, tried in order; repeatable. Fields: {id}, "
                        "{id_basename}, {id_safe}, {ext}, {url_basename} (PhotoChat), {split} (MMDialog)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--workers", type=int, default=8, help="threads checking image files")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_guard(_prepare))

    p = sub.add_parser("stats", help="counts, dialog lengths and token lengths of a dataset dir")
    p.add_argument("dir")
    p.add_argument("--tokenizer", default="ViT-B-32", help="open_clip model name whose tokenizer counts tokens")
    p.add_argument("--max-examples", type=int, default=None, help="token lengths of the first N examples per split")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None, help="write a PNG histogram of context token lengths here")
    p.set_defaults(func=_guard(_stats))
