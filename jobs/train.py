"""Ray job entry point: `python jobs/train.py --config FILE` or `ray job submit -- python jobs/train.py ...`."""

import sys

from dialclip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
