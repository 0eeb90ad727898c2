"""Ray job entry point for `dialclip data prepare` (the same code as the console command).

    ray job submit --working-dir . -- python jobs/prepare_data.py --format photochat --input DIR --images DIR --out DIR
"""

import sys

from dialclip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(['data', 'prepare', *sys.argv[1:]]))
