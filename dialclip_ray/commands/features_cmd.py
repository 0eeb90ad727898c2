"""``dialclip features``: build or inspect the frozen feature store of a prepared dataset."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="frozen CLIP features of dialog contexts, computed once (Ray Data)")
    fsub = p.add_subparsers(dest="features_command", required=True, metavar="ACTION")
    b = fsub.add_parser("build", help="embed every distinct context turn and image of the dataset(s) once")
    b.add_argument("--data", action="append", required=True, help="prepared dataset dir; repeat for several")
    b.add_argument("--backbone", default="dialclip-tiny", help="open_clip model name")
    b.add_argument("--pretrained", default=None, help="open_clip tag or local checkpoint path (default: random)")
    b.add_argument("--actors", type=int, default=2, help="encoder actors in the Ray Data pool")
    b.add_argument("--gpus-per-actor", type=float, default=0.0,
                   help="GPUs each encoder actor requests (1, or 0.5 to share a card; 0 = CPU actors)")
    b.add_argument("--batch-size", type=int, default=256)
    b.add_argument("--force", action="store_true", help="rebuild even when a matching store exists")
    b.set_defaults(func=build)
    i = fsub.add_parser("info", help="print a store's summary (store.json)")
    i.add_argument("store", help="store directory (<dataset>/features/<backbone>-<hash>)")
    i.set_defaults(func=info)


def build(args: argparse.Namespace) -> int:
    from dialclip_ray.features.build import build_feature_store
    from dialclip_ray.features.store import check_store

    for data in args.data:
        path = build_feature_store(data, args.backbone, args.pretrained, actors=args.actors,
                                   batch_size=args.batch_size, force=args.force, gpus_per_actor=args.gpus_per_actor)
        meta = check_store(path)
        print(f"{data}: {meta['turns']} turns + {meta['images']} images, dim {meta['dim']}, "
              f"built in {meta['build_seconds']} s -> {path}")
    return 0


def info(args: argparse.Namespace) -> int:
    from dialclip_ray.features.store import check_store

    print(json.dumps(check_store(args.store), indent=2))
    return 0
