"""Atomic publication of a directory built under a temporary name."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` is swapped aside first, then removed.

    Readers see either the old directory or the new one, never a half-written one.
    """
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
