"""Ray job entry point for sweeps (`dialclip tune`).

    ray job submit --working-dir . -- python tune/sweep.py --space SPACE.yaml --name NAME --storage /shared/runs/tune
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs"))
from _entry import run

if __name__ == "__main__":
    sys.exit(run(["tune"]))
