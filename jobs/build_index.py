"""Ray job entry point: `python jobs/build_index.py --checkpoint CKPT --corpus DIR --out DIR --shards 4`
(or through `ray job submit -- python jobs/build_index.py ...`)."""

import sys

from dialclip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", "build", *sys.argv[1:]]))
