"""Time ``generate()`` for 10,000 dialogs against the 60 s target (issue 3, item 5).

Reports wall seconds, CPU seconds (this process + render workers), dialogs/s,
images/s, the ratio to the 60 s target, and, as a baseline measured in the same
run, the serial rate of rendering+encoding one image (so the parallel speed-up
and the share of time spent outside rendering are visible). The machine is
shared: the load average before and after is recorded because wall time on a
loaded 2-core box says little; CPU seconds are the stable number.

    python bench/synthetic_speed.py [--dialogs 10000] [--image-size 64] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from dialclip_ray.data.synthetic import ALL_SCENES, generate  # noqa: E402
from dialclip_ray.data.synthetic.scenes import encode_jpeg, render  # noqa: E402

TARGET_S = 60.0


def _cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def serial_render_rate(size: int, n: int = 1000) -> float:
    rng = random.Random(0)
    t = time.perf_counter()
    for i in range(n):
        encode_jpeg(render(rng.choice(ALL_SCENES), size, f"bench:{i}"))
    return n / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dialogs", type=int, default=10_000)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    baseline = serial_render_rate(args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        cpu0, t0 = _cpu(), time.perf_counter()
        meta = generate(Path(tmp) / "corpus", dialogs=args.dialogs, image_size=args.image_size,
                        workers=args.workers, progress=False)
        wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
        size_mb = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()) / 2**20
    images = meta["counts"]["images"]
    result = {
        "dialogs": args.dialogs, "image_size": args.image_size, "workers": args.workers or min(2, os.cpu_count() or 1),
        "cpu_count": os.cpu_count(), "images": images, "corpus_mb": round(size_mb, 1),
        "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
        "dialogs_per_s": round(args.dialogs / wall, 1), "images_per_s": round(images / wall, 1),
        "target_seconds": TARGET_S, "ratio_to_target": round(wall / TARGET_S, 3),
        "baseline_serial_render_images_per_s": round(baseline, 1),
        "serial_render_only_seconds_estimate": round(images / baseline, 2),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "command": "python bench/synthetic_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "synthetic_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
