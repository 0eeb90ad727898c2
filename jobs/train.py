"""Ray job entry point for `dialclip train` (the same code as the console command).

    ray job submit --working-dir . -- python jobs/train.py --config FILE
"""

import sys

from dialclip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(['train', *sys.argv[1:]]))
