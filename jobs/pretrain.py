"""Ray job entry point for `dialclip pretrain` (the same code as the console command).

    ray job submit --working-dir . -- python jobs/pretrain.py --data ROOT
"""

import sys

from _entry import run  # jobs/ is sys.path[0] when Ray runs `python jobs/pretrain.py`

if __name__ == "__main__":
    sys.exit(run(['pretrain']))
