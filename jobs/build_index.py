"""Ray job entry point for `dialclip index build` (the same code as the console command).

    ray job submit --working-dir . -- python jobs/build_index.py --checkpoint /shared/runs/train/RUN \
        --corpus /shared/data/photochat --out /shared/runs/train/RUN/index

--checkpoint takes a run directory (its best/) or a checkpoint directory.
"""

import sys

from _entry import (
    run,  # jobs/ is sys.path[0] when Ray runs `python jobs/build_index.py`
)

if __name__ == "__main__":
    sys.exit(run(['index', 'build']))
