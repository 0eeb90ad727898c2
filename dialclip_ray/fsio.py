"""Atomic file and directory writes: the one owner of "a reader never sees half a file".

Every artifact the pipeline hands on (Parquet tables, checkpoints, manifests,
configs, index directories) is written under a hidden temporary name beside its
target and renamed into place. A rename within one directory is atomic on POSIX,
so a process killed at any point leaves either the old output or the new one,
never a mix; the temporaries start with ``.`` and are never taken for outputs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it to ``path``.

    ``write`` may be anything that writes a file by name (``torch.save``, ``pq.write_table``...).
    On any error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def publish_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Move the finished directory ``tmp`` to ``out``; an existing ``out`` is swapped aside, then removed.

    Readers see the old directory or the new one, never a half-written one; the old one is
    deleted only after the new one is in place.
    """
    tmp, out = Path(tmp), Path(out)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    _fsync_dir(out.parent)
    return out


@contextlib.contextmanager
def staging_dir(out: str | os.PathLike, tag: str = "building") -> Iterator[Path]:
    """A hidden directory beside ``out`` to build into; published as ``out`` on success, removed on error."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-", dir=out.parent))
    try:
        yield tmp
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_dir_atomic(src: str | os.PathLike, out: str | os.PathLike,
                    names: list[str] | None = None) -> Path:
    """Copy ``src`` (or only ``names`` in it) to ``out`` through a staging directory."""
    src = Path(src)
    with staging_dir(out, tag="copy") as tmp:
        for name in names if names is not None else [p.name for p in src.iterdir()]:
            item = src / name
            if item.is_dir():
                shutil.copytree(item, tmp / name)
            else:
                shutil.copy2(item, tmp / name)
    return Path(out)


# The name older modules use; one implementation.
replace_dir = publish_dir
