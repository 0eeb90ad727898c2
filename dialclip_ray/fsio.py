"""Atomic file and directory writes: the one owner of "a reader never sees half a file".

Every artifact the pipeline hands on (Parquet tables, checkpoints, manifests,
configs, index directories) is written under a hidden temporary name beside its
target and renamed into place. A rename within one directory is atomic on POSIX,
so a process killed at any point leaves either the old output or the new one,
never a mix; the temporaries start with ``.`` and are never taken for outputs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import shutil
import socket
import sys
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
    sweep_stale_staging(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.w-{_owner()}-", suffix=".tmp")
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


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the platform or file system cannot (the caller falls back).
    """
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _libc = False
    if not _libc or not hasattr(_libc, "renameat2"):
        return False
    if _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Move the finished directory ``tmp`` to ``out``; an existing ``out`` is replaced, then removed.

    On Linux an existing ``out`` is swapped with ``tmp`` in one ``renameat2(RENAME_EXCHANGE)``:
    there is no moment without ``out``. Elsewhere it is renamed aside and ``tmp`` renamed in
    (put back if that fails). Either way readers see the old directory or the new one, never a
    half-written one, and the old one is deleted only after the new one is in place.
    """
    tmp, out = Path(tmp), Path(out)
    if out.exists():
        if _exchange(tmp, out):
            _fsync_dir(out.parent)
            _remove(tmp)  # now holds the old ``out``
            return out
        old = out.with_name(f".{out.name}.old-{_owner()}-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)  # put the previous directory back
            raise
        _fsync_dir(out.parent)
        _remove(old)
    else:
        os.rename(tmp, out)
        _fsync_dir(out.parent)
    return out


def _host() -> str:
    """This host's name as it appears in staging names (no '-': the name's fields are '-'-separated)."""
    return socket.gethostname().replace("-", "_")


def _owner() -> str:
    """``<host>-<pid>``: the middle of every staging name, what ``sweep_stale_staging`` reads back."""
    return f"{_host()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale_staging(out: str | os.PathLike) -> list[Path]:
    """Remove staging dirs and temp files beside ``out`` left by killed processes of this host.

    Each is named ``.<out>.<tag>-<host>-<pid>-<random>``: one whose process is gone was
    never published (SIGKILL skips every cleanup) and is never read, but would pile up. Dirs of
    other hosts (a shared filesystem) and of live processes are left alone.
    """
    out = Path(out)
    host = _host()
    removed = []
    for path in out.parent.glob(f".{glob.escape(out.name)}.*-{glob.escape(host)}-*-*"):
        try:
            pid = int(path.name[len(f".{out.name}."):].split("-")[-2])
        except (ValueError, IndexError):
            continue
        if not _alive(pid):
            _remove(path)
            removed.append(path)
    return removed


@contextlib.contextmanager
def staging_dir(out: str | os.PathLike, tag: str = "building") -> Iterator[Path]:
    """A hidden directory beside ``out`` to build into; published as ``out`` on success, removed on error.

    Leftovers of killed earlier attempts are swept first (``sweep_stale_staging``).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_staging(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-{_owner()}-", dir=out.parent))
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

