"""Ray job entry point for `dialclip pretrain` (the same code as the console command).

    ray job submit --working-dir . -- python jobs/pretrain.py --data ROOT
"""

import sys

from dialclip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(['pretrain', *sys.argv[1:]]))
