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

    result = generate(args.out, dialogs=args.dialogs, seed=args.seed, image_size=args.image_size,
                      photochat_sizes=args.photochat_sizes, mmdialog_sizes=args.mmdialog_sizes,
                      caption_images=args.caption_images, overwrite=args.overwrite)
    if result is not None:
        print(json.dumps(result, indent=2, default=str) if isinstance(result, dict) else result)
    return 0


STREAMING_ONLY = ("processes", "segment_mb", "batch_rows", "restart")


def _prepare(args: argparse.Namespace) -> int:
    streaming = args.format == "mmdialog" and not args.in_memory
    if not streaming:
        used = [f"--{n.replace('_', '-')}" for n in STREAMING_ONLY if getattr(args, n) not in (None, False)]
        if used:
            raise ValueError(f"{', '.join(used)} only apply to the streaming MMDialog converter "
                             f"(--format mmdialog without --in-memory)")
    if args.in_memory and args.format != "mmdialog":
        raise ValueError("--in-memory only applies to --format mmdialog (PhotoChat is always converted in memory)")
    if streaming:
        from dialclip_ray.data.mmdialog_stream import (DEFAULT_BATCH_ROWS, DEFAULT_SEGMENT_BYTES,
                                                       convert_mmdialog)

        meta = convert_mmdialog(
            args.input, args.out, args.images, on_error=args.on_error, image_patterns=args.image_pattern or None,
            max_pixels=args.max_pixels, check_images=not args.no_image_check, processes=args.processes,
            image_threads=args.workers, segment_bytes=int(args.segment_mb * 2**20) if args.segment_mb
            else DEFAULT_SEGMENT_BYTES, batch_rows=args.batch_rows or DEFAULT_BATCH_ROWS, restart=args.restart,
            progress=not args.quiet)
    else:
        from dialclip_ray.data.prepare import prepare

        meta = prepare(args.format, args.input, args.images, args.out, on_error=args.on_error,
                       image_patterns=args.image_pattern or None, max_pixels=args.max_pixels,
                       progress=not args.quiet, workers=args.workers, check_images=not args.no_image_check)
    counts, skipped = meta["counts"], meta["skipped"]
    print(f"wrote {args.out}: {counts['examples']} examples, {counts['images']} images, {counts['texts']} texts; "
          f"skipped {skipped['total']} {skipped['by_reason'] or ''}".rstrip())
    if streaming:
        st = meta["streaming"]
        print(f"  {st['segments']} example shards in {args.out}/examples/ ({st['resumed_segments']} segments "
              f"reused from an interrupted run), {st['processes']} processes, {meta['timings_s']['total']:.1f} s")
    return 0


PREPARE_HELP = """\
Convert PhotoChat or MMDialog files into a canonical dataset dir (examples, images, texts as Parquet
plus meta.json). Every record error names the file, the record and the field; --on-error skip counts
bad records (and rows whose images are bad) in meta.json instead of failing. Output is published
atomically: a failed conversion never leaves a half-written --out.

MMDialog is converted by a streaming converter (data/mmdialog_stream.py) so that the full training
split (1,059,117 conversations) fits in bounded memory (about 2 GiB with the defaults, whatever the
input size): conversations.json (a JSON array, decoded incrementally, or JSON Lines) is cut into
segments of --segment-mb at record boundaries, the segments are converted in parallel by
--processes worker processes, and the examples are written as shards examples/part-NNNNN.parquet
(one per segment, in input order; images.parquet and texts.parquet stay single files). Work happens
in .<out>.convert/ beside --out; every shard is written atomically and a segment counts as done only
when its completion record exists, so an interrupted run (killed, out of disk, a data error in fail
mode) started again with the same command continues from the finished segments (--restart discards
them). Two differences to --in-memory: a JSON structure error (array not closed) in any file is
reported before record errors of earlier files, and an image is looked up in its own split
directory first, then in the other split directories of the input. --in-memory uses the previous
loader (everything in memory, one examples.parquet; fine for small inputs such as valid/test).
"""


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
    p.add_argument("--photochat-sizes", type=int, nargs=3, metavar=("TRAIN", "DEV", "TEST"), default=None,
                   help="PhotoChat-style dialogs per split (the benchmark: 4000 500 1000; then --dialogs is ignored)")
    p.add_argument("--mmdialog-sizes", type=int, nargs=3, metavar=("TRAIN", "VALID", "TEST"), default=None,
                   help="MMDialog-style conversations per split (the benchmark: 2800 360 720)")
    p.add_argument("--caption-images", type=int, default=0,
                   help="extra caption-only images to pretrain the small CLIP on (the benchmark: 30000)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_guard(_synth))

    p = sub.add_parser("prepare", help="convert PhotoChat or MMDialog files into a canonical dataset dir",
                       description=PREPARE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=["photochat", "mmdialog"])
    p.add_argument("--input", required=True, help="a shard file or directory (PhotoChat); root or split dir (MMDialog)")
    p.add_argument("--images", default=None, help="image root (MMDialog default: the input root)")
    p.add_argument("--out", required=True)
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    p.add_argument("--image-pattern", action="append", default=[],
                   help="file name template relative to --images, tried in order; repeatable. Fields: {id}, "
                        "{id_basename}, {id_safe}, {ext}, {url_basename} (PhotoChat), {split} (MMDialog)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--workers", type=int, default=8, help="threads checking image files (per process)")
    p.add_argument("--no-image-check", action="store_true",
                   help="do not open the image files: write the first --image-pattern name of every image "
                        "(width/height left empty) without checking that it exists; for a conversion before "
                        "the images are downloaded. Off by default")
    p.add_argument("--in-memory", action="store_true",
                   help="MMDialog: use the in-memory loader (one examples.parquet) instead of the streaming converter")
    p.add_argument("--processes", type=int, default=None,
                   help="MMDialog streaming: worker processes, up to ~300 MB each (default: CPUs, at most 5, which "
                        "keeps the whole conversion under 2 GiB; 0 = convert in the main process)")
    p.add_argument("--segment-mb", type=float, default=None,
                   help="MMDialog streaming: input megabytes per segment = per example shard (default 32)")
    p.add_argument("--batch-rows", type=int, default=None,
                   help="MMDialog streaming: most example rows held and written at once (default 2048)")
    p.add_argument("--restart", action="store_true",
                   help="MMDialog streaming: discard the finished segments of an interrupted run and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_guard(_prepare))

    p = sub.add_parser("stats", help="counts, dialog lengths and token lengths of a dataset dir")
    p.add_argument("dir")
    p.add_argument("--tokenizer", default="ViT-B-32", help="open_clip model name whose tokenizer counts tokens")
    p.add_argument("--max-examples", type=int, default=None, help="token lengths of the first N examples per split")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None, help="write a PNG histogram of context token lengths here")
    p.set_defaults(func=_guard(_stats))
