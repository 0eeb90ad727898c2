"""Ray job entry point for `dialclip train` (the same code as the console command).

    ray job submit --working-dir . -- python jobs/train.py --config configs/vitb32.yaml \
        --data /shared/data/photochat --storage /shared/runs/train

The run directory is <storage>/<run name>/ (best/, latest/, metrics); paths must be absolute and on
storage every node sees (dialclip_ray.jobpaths says why).
"""

import sys

from _entry import run  # jobs/ is sys.path[0] when Ray runs `python jobs/train.py`

if __name__ == "__main__":
    sys.exit(run(['train']))
