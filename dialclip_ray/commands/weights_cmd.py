"""``dialclip weights fetch``: download a backbone's pretrained weights into the shared cache once.

On a cluster every Train worker, feature/evaluation actor and Serve replica loads the backbone
itself; with ``DIALCLIP_WEIGHTS_DIR`` (or ``model.backbone.cache_dir``) pointing at shared storage
and this command run once, they all read one file instead of each downloading it.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="pretrained backbone weights: fill the shared cache")
    wsub = p.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    f = wsub.add_parser("fetch", help="download an open_clip tag's weights into the weights cache")
    f.add_argument("--backbone", default="ViT-B-32", help="open_clip model name")
    f.add_argument("--pretrained", default="openai", help="open_clip pretrained tag")
    f.add_argument("--cache-dir", default=None,
                   help="cache directory (default: $DIALCLIP_WEIGHTS_DIR, else open_clip's ~/.cache)")
    f.set_defaults(func=fetch)


def fetch(args: argparse.Namespace) -> int:
    from dialclip_ray.model.backbone import WEIGHTS_DIR_ENV, fetch_weights, needs_quick_gelu, weights_dir

    try:
        path = fetch_weights(args.backbone, args.pretrained, args.cache_dir)
    except FileNotFoundError as exc:
        print(f"error: {exc}")
        return 2
    cache = weights_dir(args.cache_dir)
    print(f"{args.backbone}/{args.pretrained}: {path} ({path.stat().st_size / 2**20:.1f} MiB)"
          f"{', QuickGELU' if needs_quick_gelu(args.backbone, args.pretrained) else ''}")
    if cache:
        print(f"every node reads it with {WEIGHTS_DIR_ENV}={cache} (or model.backbone.cache_dir: {cache})")
    else:
        print(f"cached in open_clip's per-node default; set {WEIGHTS_DIR_ENV} to a shared directory on a cluster")
    return 0
