"""Ray job entry point for `dialclip evaluate` (the same code as the console command).

    ray job submit --working-dir . -- python jobs/evaluate.py --checkpoint NAME=/shared/runs/train/RUN \
        --data /shared/data/photochat --out /shared/runs/eval/RUN

Paths must be absolute and on storage every node sees (dialclip_ray.jobpaths says why).
"""

import sys

from _entry import run  # jobs/ is sys.path[0] when Ray runs `python jobs/evaluate.py`

if __name__ == "__main__":
    sys.exit(run(['evaluate']))
