"""Ray job entry point for sweeps: `python tune/sweep.py --space tune/synthetic.yaml --name NAME`."""

import sys

from dialclip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
