"""Ray job entry point for `dialclip data prepare` (the same code as the console command).

    ray job submit --working-dir . -- python jobs/prepare_data.py --format photochat --input DIR --images DIR --out DIR
"""

import sys

from _entry import (
    run,  # jobs/ is sys.path[0] when Ray runs `python jobs/prepare_data.py`
)

if __name__ == "__main__":
    sys.exit(run(['data', 'prepare']))
