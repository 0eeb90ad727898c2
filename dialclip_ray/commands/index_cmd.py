"""``dialclip index build``: embed prepared corpora with a checkpoint into a sharded serving index."""

from __future__ import annotations

import argparse
import json

from dialclip_ray import storage


def parse_params(pairs: list[str] | None) -> dict:
    """``key=value`` pairs; values parsed as JSON when they can be (``nlist=64`` -> 64)."""
    params = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--param expects key=value, got {pair!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build the sharded FAISS index that `dialclip serve` searches")
    isub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    b = isub.add_parser("build", help="embed every image/text of the corpora (Ray Data) and shard them")
    b.add_argument("--checkpoint", required=True,
                   help="training run directory (uses its best/) or DialCLIP checkpoint directory (local or URI)")
    b.add_argument("--corpus", action="append", required=True, help="prepared dataset dir; repeat for several")
    b.add_argument("--out", required=True, help="index directory to create (local or s3://, gs:// URI)")
    b.add_argument("--shards", type=int, default=1)
    b.add_argument("--kind", default="flat", choices=["flat", "ivf", "ivfpq", "hnsw", "factory"],
                   help="ivf: nlist from the corpus size and nprobe 10 unless --param says otherwise "
                        "(measured in bench/results/ann_recall.json; see dialclip_ray/index/factory.py)")
    b.add_argument("--factory", default=None, metavar="STRING",
                   help="a FAISS index_factory string, e.g. 'IVF{nlist},PQ32x8,Refine(Flat)' ({nlist} = the "
                        "corpus-size default); implies --kind factory")
    b.add_argument("--param", action="append", default=[], help="index parameter key=value (e.g. nlist=256)")
    b.add_argument("--versioned", action="store_true",
                   help="--out is a version root: write OUT/<index_id>/ beside the served version (OUT/CURRENT "
                        "is set only by the first build, --activate, `index activate` or the admin route)")
    b.add_argument("--activate", action="store_true", help="with --versioned: make the new index CURRENT")
    b.add_argument("--actors", type=int, default=2, help="encoder actors in the Ray Data pool")
    b.add_argument("--gpus-per-actor", type=float, default=0.0,
                   help="GPUs each encoder actor requests (1, or 0.5 to share a card; 0 = CPU actors)")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--target", action="append", choices=["image", "text"], default=None,
                   help="modalities to index (default: both)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index (swapped in when complete)")
    b.set_defaults(func=main)
    a = isub.add_parser("activate", help="make a version of a version root the one it serves (OUT/CURRENT)")
    a.add_argument("--root", required=True, help="version root written by `index build --versioned`")
    a.add_argument("--version", required=True, help="index_id to serve (a directory under --root)")
    a.set_defaults(func=activate_main)


def activate_main(args: argparse.Namespace) -> int:
    from dialclip_ray.index.layout import activate

    layout = activate(args.root, args.version)
    print(f"{args.root}: now serves {layout.index_id} (running apps pick it up within their poll interval)")
    return 0


def main(args: argparse.Namespace) -> int:
    from dialclip_ray.index import validate_params
    from dialclip_ray.index.build import build_index
    from dialclip_ray.rundir import RunDirError, resolve_checkpoint

    params = parse_params(args.param)
    if args.factory is not None:
        args.kind, params = "factory", {**params, "factory": args.factory}
    validate_params(args.kind, params)  # fail before starting Ray
    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
    except RunDirError as exc:
        print(f"error: {exc}")
        return 2
    layout = build_index(checkpoint, args.corpus, args.out, shards=args.shards, kind=args.kind, params=params,
                         actors=args.actors, target_types=tuple(args.target or ("image", "text")),
                         batch_size=args.batch_size, overwrite=args.overwrite, gpus_per_actor=args.gpus_per_actor,
                         versioned=args.versioned, activate=True if args.activate else None)
    where = layout.directory if not storage.is_uri(args.out) else args.out
    for target, m in layout.manifests.items():
        print(f"{target}: {m.total_count} vectors of dim {m.dim} in {len(m.shards)} {m.kind} shard(s) "
              f"-> {where}/{target}")
    print(f"index written to {where} (version {layout.index_id})")
    return 0
