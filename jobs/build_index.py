"""Ray job entry point for `dialclip index build` (the same code as the console command).

    ray job submit --working-dir . -- python jobs/build_index.py --checkpoint DIR --corpus DIR --out DIR
"""

import sys

from dialclip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(['index', 'build', *sys.argv[1:]]))
