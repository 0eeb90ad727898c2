"""The run directory: the contract between ``dialclip train``, ``dialclip index build`` and serving.

A training run directory (``<storage_path>/<run name>/``, written by ``dialclip_ray.train.run``)
holds ``best/`` and ``latest/`` (DialCLIP checkpoints), ``metrics.json``/``.csv``,
``training_curves.png`` and ``train_config.yaml``. Everything downstream takes the run directory
and picks the checkpoint itself (``best/``); an index directory's ``index.json`` names the
checkpoint it was built from, so an index alone is enough to serve. By convention an index of a
run may live in ``<run>/index/``; ``dialclip serve --run R`` then needs no ``--index``.

Relative paths are resolved against the current working directory (for ``serve run
serve/serve_config.yaml``: the directory ``serve run`` was started in; the app builder runs in a
Ray task that inherits it). Errors say what was looked for, where, and what would produce it.

Run, checkpoint and index locations may be object-store URIs (``s3://``, ``gs://``): they are
checked through ``dialclip_ray.storage``; ``resolve_checkpoint`` returns the URI itself (Ray Data
actors read it on their own node), ``resolve_serving`` a node-local copy (``storage.local_dir``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dialclip_ray import storage

BEST = "best"
LATEST = "latest"
RUN_INDEX = "index"
WEIGHTS = "dialclip.pt"  # dialclip_ray.model.checkpoint.WEIGHTS_FILE (not imported: that pulls in torch)
INDEX_INFO = "index.json"  # dialclip_ray.index.layout.INFO_FILE


class RunDirError(FileNotFoundError):
    """A run, checkpoint or index path that does not hold what it should."""


def _shown(path: str | os.PathLike, base: Path) -> str:
    """``'runs/x'`` plus, for a relative path, where it was resolved."""
    p = Path(path).expanduser()
    return f"'{path}'" if p.is_absolute() else f"'{path}' (resolved against {base} to {base / p})"


def _absolute(path: str | os.PathLike, base: Path) -> Path:
    p = Path(path).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def is_checkpoint(path: Path) -> bool:
    return (path / WEIGHTS).is_file() or (path.is_file() and path.name == WEIGHTS)


def is_run_dir(path: Path) -> bool:
    return (path / BEST / WEIGHTS).is_file() or (path / LATEST / WEIGHTS).is_file()


def _uri_checkpoint(path: str, which: str | None) -> str:
    """The checkpoint at URI ``path`` (itself, or its ``which``/ when it is a run directory)."""
    if storage.is_file(storage.join(path, WEIGHTS)) and which is None:
        return path
    for sub in ([which] if which else [BEST]):
        if storage.is_file(storage.join(path, sub, WEIGHTS)):
            return str(storage.join(path, sub))
    found = storage.list_names(path)[:12]
    if not found:
        raise RunDirError(f"run directory {path} does not exist (nothing under that prefix); a run directory is "
                          f"what `dialclip train` writes at <run.storage_path>/<run.name>/")
    raise RunDirError(f"{path} is neither a DialCLIP checkpoint (no {WEIGHTS}) nor a training run directory "
                      f"(no {which or BEST}/{WEIGHTS}); it holds {found}")


def run_checkpoint(run_dir: str | os.PathLike, which: str = BEST,
                   base: str | os.PathLike | None = None) -> Path | str:
    """``<run_dir>/best`` (or ``latest``) of a training run directory, absolute (a URI stays a URI)."""
    if storage.is_uri(run_dir):
        return _uri_checkpoint(str(storage.normalize(run_dir)), which)
    base = Path(base or os.getcwd()).resolve()
    run = _absolute(run_dir, base)
    if not run.is_dir():
        raise RunDirError(f"run directory {_shown(run_dir, base)} does not exist; a run directory is what "
                          f"`dialclip train` writes at <run.storage_path>/<run.name>/ (best/, latest/, metrics.json)")
    ckpt = run / which
    if not (ckpt / WEIGHTS).is_file():
        found = sorted(p.name for p in run.iterdir())[:12]
        hint = (" (it is a checkpoint directory itself: pass it as `checkpoint`)" if is_checkpoint(run)
                else " (training has not finished an epoch yet, or this is not a run directory)")
        raise RunDirError(f"{run} is not a training run directory: no {which}/{WEIGHTS}{hint}; it holds {found}")
    return ckpt


def resolve_checkpoint(path: str | os.PathLike, base: str | os.PathLike | None = None) -> Path | str:
    """A checkpoint directory (or its ``dialclip.pt``) as given, or a run directory's ``best/``; absolute."""
    if storage.is_uri(path):
        return _uri_checkpoint(str(storage.normalize(path)), None)
    base = Path(base or os.getcwd()).resolve()
    p = _absolute(path, base)
    if is_checkpoint(p):
        return p
    if is_run_dir(p):
        return run_checkpoint(p, BEST)
    if not p.exists():
        raise RunDirError(f"checkpoint {_shown(path, base)} does not exist")
    raise RunDirError(f"{p} is neither a DialCLIP checkpoint (no {WEIGHTS}) nor a training run directory "
                      f"(no {BEST}/{WEIGHTS})")


def index_checkpoint(index_dir: Path) -> Path:
    """The checkpoint an index was built from, as its ``index.json`` names it."""
    if (index_dir / "CURRENT").is_file():  # a version root: the version it serves
        from dialclip_ray.index.layout import resolve_index_dir

        index_dir = resolve_index_dir(index_dir)
    info_path = index_dir / INDEX_INFO
    info = json.loads(info_path.read_text(encoding="utf-8"))
    named = info.get("checkpoint")
    if not named:
        raise RunDirError(f"{info_path} does not name the checkpoint the index was built from; "
                          f"pass `checkpoint` or `run_dir` (dialclip serve --checkpoint/--run) as well")
    if storage.is_uri(named):
        return storage.local_dir(_uri_checkpoint(named, None))
    ckpt = Path(named)
    if not is_checkpoint(ckpt):
        raise RunDirError(f"{info_path} names checkpoint {named}, which does not exist here (the index was "
                          f"built elsewhere or the run moved); pass `checkpoint` or `run_dir` explicitly")
    return ckpt


def resolve_serving(checkpoint: str | None = None, run_dir: str | None = None, index_dir: str | None = None,
                    base: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(checkpoint, index directory), both absolute, from any of the accepted forms:

    ``checkpoint`` + ``index_dir``; ``run_dir`` [+ ``index_dir``, default ``<run_dir>/index``];
    ``index_dir`` alone (its ``index.json`` names the checkpoint). ``checkpoint`` may also be a run
    directory. The checkpoint/index identity check is the caller's (``build_app``).
    """
    base = Path(base or os.getcwd()).resolve()
    if checkpoint and run_dir:
        raise ValueError("give `checkpoint` or `run_dir`, not both (a run directory serves its best/ checkpoint)")
    ckpt = None
    if run_dir and storage.is_uri(run_dir) and not index_dir \
            and storage.is_file(storage.join(storage.normalize(run_dir), RUN_INDEX, INDEX_INFO)):
        index_dir = str(storage.join(storage.normalize(run_dir), RUN_INDEX))
    if run_dir:
        ckpt = run_checkpoint(run_dir, BEST, base)
    elif checkpoint:
        ckpt = resolve_checkpoint(checkpoint, base)
    if ckpt is not None and storage.is_uri(ckpt):
        ckpt = storage.local_dir(ckpt)  # serving reads files: a node-local copy of the published checkpoint
    if index_dir and storage.is_uri(index_dir):
        if not storage.is_file(storage.join(storage.normalize(index_dir), INDEX_INFO)):
            raise RunDirError(f"index_dir {index_dir} has no {INDEX_INFO} (not a finished index)")
        index_dir = str(storage.local_dir(storage.normalize(index_dir)))
    if index_dir:
        index = _absolute(index_dir, base)
        if not (index / INDEX_INFO).is_file() and not (index / "CURRENT").is_file():  # an index or a version root
            what = "does not exist" if not index.exists() else f"has no {INDEX_INFO} (not a finished index)"
            raise RunDirError(f"index_dir {_shown(index_dir, base)} {what}; build one with "
                              f"`dialclip index build --checkpoint RUN_DIR --corpus DATA --out DIR`")
    elif run_dir and (ckpt.parent / RUN_INDEX / INDEX_INFO).is_file():
        index = ckpt.parent / RUN_INDEX
    else:
        where = f" and {ckpt.parent / RUN_INDEX} holds none" if run_dir else ""
        raise ValueError(f"no index to serve: give index_dir (dialclip serve --index DIR){where}; "
                         f"build one with `dialclip index build --checkpoint RUN_DIR --corpus DATA --out DIR`")
    return (ckpt or index_checkpoint(index)), index


def publish_link(link: str | os.PathLike, target: str | os.PathLike) -> Path | None:
    """Point the symlink ``link`` at ``target`` (stored relative, so a moved ``runs/`` keeps working),
    replacing an older link atomically. Returns ``link``, or None where symlinks are not possible."""
    link, target = Path(link), Path(target).resolve()
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.exists() and not link.is_symlink():
        raise FileExistsError(f"{link} exists and is not a symlink; move it away to publish {target} there")
    tmp = link.parent / f".{link.name}.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(target, link.parent.resolve()), tmp)
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)
        return None
    return link
