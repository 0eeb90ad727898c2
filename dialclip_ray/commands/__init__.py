"""Thin argparse front-ends for the dialclip command groups; logic lives in the library."""
