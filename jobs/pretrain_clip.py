"""Ray job: pretrain the small CLIP on a synthetic corpus (``dialclip pretrain`` as a script).

    python jobs/pretrain_clip.py --data ROOT
    ray job submit --working-dir . -- python jobs/pretrain_clip.py --data ROOT --workers 2

Joins the cluster when RAY_ADDRESS is set (as under ``ray job submit``), else
starts a small local one.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dialclip_ray.commands.pretrain_cmd import add_arguments, run  # noqa: E402
from dialclip_ray.pretrain.run import ensure_ray  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local cluster (ignored with RAY_ADDRESS)")
    args = parser.parse_args(argv)
    ensure_ray(max(args.num_cpus, args.workers))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
