"""Where runs, evaluation outputs and indexes live: a local path or an object-store URI.

The one owner of "local or ``s3://`` / ``gs://``". A location is either a local path (made
absolute, returned as ``Path``) or a URI (kept as the string it is, never passed through
``Path(...).resolve()``, which would turn ``s3://b/r`` into ``<cwd>/s3:/b/r``). Files are read and
written through ``pyarrow.fs`` (the filesystem layer Ray Train itself uses for ``storage_path``,
so credentials and endpoints come from the same environment: ``AWS_*``, ``AWS_ENDPOINT_URL``,
``GOOGLE_APPLICATION_CREDENTIALS``).

Code that needs files on disk (torch.load, FAISS, matplotlib) works in a local directory:
``local_dir`` downloads a URI directory into a node-local cache (each process that needs it: a
driver, a Ray Data actor on another node, a Serve replica), and ``output_dir`` builds into a local
temporary directory and uploads it when the block ends. Local paths pass straight through both.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

Location = Path | str
CACHE_ENV = "DIALCLIP_CACHE_DIR"


def is_uri(path: str | os.PathLike | None) -> bool:
    return path is not None and "://" in str(path)


def normalize(path: str | os.PathLike) -> Location:
    """A URI unchanged (minus a trailing ``/``); a local path expanded and absolute."""
    if is_uri(path):
        return str(path).rstrip("/")
    return Path(path).expanduser().resolve()


def join(base: Location, *parts: str) -> Location:
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return Path(base).joinpath(*parts)


def name_of(path: Location) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def _fs(path: Location):
    import pyarrow.fs as pafs

    if is_uri(path):
        return pafs.FileSystem.from_uri(str(path))
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def _type(path: Location):
    fs, p = _fs(path)
    return fs.get_file_info(p).type


def exists(path: Location) -> bool:
    import pyarrow.fs as pafs

    return _type(path) != pafs.FileType.NotFound


def is_file(path: Location) -> bool:
    import pyarrow.fs as pafs

    return _type(path) == pafs.FileType.File


def is_dir(path: Location) -> bool:
    """A directory (for object storage: a prefix that holds at least one object)."""
    import pyarrow.fs as pafs

    return _type(path) == pafs.FileType.Directory


def list_names(path: Location) -> list[str]:
    """Names directly under ``path`` (sorted); [] where it does not exist."""
    import pyarrow.fs as pafs

    fs, p = _fs(path)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return sorted(i.base_name for i in infos)


def read_bytes(path: Location) -> bytes:
    if not is_uri(path):
        return Path(path).read_bytes()
    fs, p = _fs(path)
    try:
        with fs.open_input_stream(p) as fh:
            return fh.read()
    except (FileNotFoundError, OSError) as exc:
        raise FileNotFoundError(f"{path}: cannot read ({exc})") from None


def read_text(path: Location) -> str:
    return read_bytes(path).decode("utf-8")


def write_text(path: Location, text: str) -> Location:
    """Write a small file: atomically on a local disk; one PUT (atomic per object) on object storage."""
    if not is_uri(path):
        from dialclip_ray.fsio import atomic_write_text

        return atomic_write_text(path, text)
    fs, p = _fs(path)
    with fs.open_output_stream(p) as fh:
        fh.write(text.encode("utf-8"))
    return path


def upload_dir(local: str | os.PathLike, dest: Location) -> Location:
    """Copy a local directory's tree to ``dest`` (a URI or a local path), file by file."""
    import pyarrow.fs as pafs

    fs, p = _fs(dest)
    if not is_uri(dest):
        Path(p).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(str(Path(local).resolve()), p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return dest


def copy_tree(src: Location, dest: Location) -> Location:
    """Copy a directory within or between filesystems (local dirs: atomically, via ``fsio``)."""
    if not is_uri(src) and not is_uri(dest):
        from dialclip_ray.fsio import copy_dir_atomic

        return copy_dir_atomic(src, dest)
    with local_dir(src, fresh=True) as here:
        return upload_dir(here, dest)


def download_dir(src: Location, local: str | os.PathLike) -> Path:
    """Copy the tree under ``src`` into the local directory ``local``."""
    import pyarrow.fs as pafs

    fs, p = _fs(src)
    if not is_dir(src):
        raise FileNotFoundError(f"{src} does not exist (or holds no files)")
    Path(local).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(p, str(Path(local).resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return Path(local)


def cache_root() -> Path:
    """Node-local cache of downloaded directories: ``$DIALCLIP_CACHE_DIR``, else ``<tmp>/dialclip-cache``."""
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "dialclip-cache")


@contextlib.contextmanager
def _fresh(src: Location) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dialclip-dl-") as tmp:
        yield download_dir(src, Path(tmp) / name_of(src))


def local_dir(src: Location, fresh: bool = False):
    """A local directory holding ``src``: ``src`` itself when local; a downloaded copy for a URI.

    Returns a ``Path`` (cached copy, reused by later calls in any process of this node: for
    immutable things such as a published checkpoint or index), or with ``fresh=True`` a context
    manager yielding a temporary copy removed afterwards (for things that change).
    """
    if not is_uri(src):
        return contextlib.nullcontext(Path(src)) if fresh else Path(src)
    if fresh:
        return _fresh(src)
    # keyed by the URI and its listing (names, sizes, mtimes): a re-published directory is fetched again
    target = cache_root() / hashlib.sha256((str(src) + _listing(src)).encode()).hexdigest()[:16] / name_of(src)
    done = target.parent / ".complete"
    if not done.exists():
        staging = Path(tempfile.mkdtemp(prefix=".dl-", dir=_mkdir(cache_root())))
        download_dir(src, staging / name_of(src))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging / name_of(src), target)
        shutil.rmtree(staging, ignore_errors=True)
        done.write_text(str(src))
    return target


def _listing(path: Location) -> str:
    import pyarrow.fs as pafs

    fs, p = _fs(path)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    return "|".join(sorted(f"{i.path}:{i.size}:{i.mtime_ns}" for i in infos if i.type == pafs.FileType.File))


def delete_dir(path: Location) -> None:
    """Remove a directory tree (a URI prefix) if it exists."""
    if not exists(path):
        return
    fs, p = _fs(path)
    fs.delete_dir(p)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def output_dir(dest: Location) -> Iterator[Path]:
    """A local directory to write ``dest``'s files into: ``dest`` itself, or a temp dir uploaded at the end."""
    if not is_uri(dest):
        yield _mkdir(Path(dest))
        return
    with tempfile.TemporaryDirectory(prefix="dialclip-up-") as tmp:
        yield Path(tmp)
        upload_dir(tmp, dest)
