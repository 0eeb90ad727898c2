"""Ray job entry point: `python jobs/evaluate.py --checkpoint PATH --data DIR` (or via `ray job submit`)."""

import sys

from dialclip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
