"""Ray job entry point for `dialclip evaluate` (the same code as the console command).

    ray job submit --working-dir . -- python jobs/evaluate.py --checkpoint NAME=DIR --data DIR
"""

import sys

from dialclip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(['evaluate', *sys.argv[1:]]))
