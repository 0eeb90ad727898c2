"""A serving index on disk: its layout, its identity, and how it is written.

Layout::

    OUT/index.json     written last: identity, corpora, per-modality counts/shards
    OUT/image/         a sharded FAISS index (``dialclip_ray.index.shards``) of every image id
    OUT/text/          the same for every text id (absent when the corpora hold no text)

Both sub-indexes carry the same identity: the checkpoint's backbone identity plus
digests of the checkpoint file and the model config. Serving compares it with the
checkpoint it loads and refuses a mismatch: vectors from one checkpoint are
meaningless to another's query encoder. The whole directory is built under a hidden
temp name and published at the end, so a failed build leaves nothing at ``OUT``.
This module is what serving reads; ``build.py`` is the Ray Data job that fills it.

Versions (hot swaps): every index gets an ``index_id`` (UTC time + random suffix) in
``index.json`` and each manifest, and every answer names it. A *version root* holds
several indexes side by side, never rewritten once published::

    ROOT/CURRENT          the served version's id (one line, replaced atomically)
    ROOT/<index_id>/      an index directory as above

``IndexLayout.load(ROOT)`` reads the version CURRENT names, so a build into the root
never touches what is being served; switching is ``activate`` (or the app's
token-guarded admin route, which pre-loads the shards first).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from dialclip_ray.fsio import atomic_write_text, staging_dir
from dialclip_ray.index.manifest import IndexManifest

INFO_FILE = "index.json"
CURRENT_FILE = "CURRENT"
FORMAT_VERSION = 1
TARGETS = ("image", "text")


class IndexMismatchError(ValueError):
    """An index built from other vectors than the checkpoint would produce."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_identity(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """Backbone identity + sha256 of ``dialclip.pt`` + sha256 of the model config (canonical JSON)."""
    from dialclip_ray.model.checkpoint import WEIGHTS_FILE, read_checkpoint  # torch: only where a checkpoint is read

    path = Path(checkpoint)
    meta, _ = read_checkpoint(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    config = json.dumps(meta["config"], sort_keys=True, separators=(",", ":"))
    return {**meta["backbone"], "checkpoint_sha256": file_sha256(weights),
            "config_sha256": hashlib.sha256(config.encode()).hexdigest()}


def check_identity(checkpoint_ident: dict[str, Any], index_ident: dict[str, Any], where: str) -> None:
    """Raise ``IndexMismatchError`` unless backbone weights and checkpoint digest agree."""
    for key in ("weights_hash", "checkpoint_sha256"):
        if checkpoint_ident.get(key) != index_ident.get(key):
            raise IndexMismatchError(
                f"{where}: index was built with {key}={index_ident.get(key)!r} but the checkpoint has "
                f"{key}={checkpoint_ident.get(key)!r}; rebuild the index with this checkpoint "
                f"(dialclip index build) or serve the checkpoint it was built from")


def new_index_id() -> str:
    """A version id that sorts by build time and never repeats (UTC seconds + 8 hex digits)."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(4)


def is_version_root(path: str | os.PathLike) -> bool:
    return (Path(path) / CURRENT_FILE).is_file()


def current_version(root: str | os.PathLike) -> str:
    """The id ``ROOT/CURRENT`` names (checked to be a plain directory name inside the root)."""
    path = Path(root) / CURRENT_FILE
    version = path.read_text(encoding="utf-8").strip()
    if not version or "/" in version or "\\" in version or version.startswith("."):
        raise ValueError(f"{path}: not a version id: {version!r}")
    if not (Path(root) / version / INFO_FILE).is_file():
        raise FileNotFoundError(f"{path} names {version!r}, which is not a complete index under {root}")
    return version


def resolve_index_dir(path: str | os.PathLike) -> Path:
    """An index directory: ``path`` itself, or for a version root the version ``CURRENT`` names."""
    path = Path(path)
    return path / current_version(path) if is_version_root(path) else path


def activate(root: str | os.PathLike, version: str) -> "IndexLayout":
    """Make ``version`` the one ``root`` serves: validated first, then ``CURRENT`` replaced atomically."""
    root = Path(root)
    if not version or "/" in version or version.startswith("."):
        raise ValueError(f"not a version id: {version!r}")
    layout = IndexLayout.load(root / version)
    atomic_write_text(root / CURRENT_FILE, version + "\n")
    return layout


@dataclass
class IndexLayout:
    """A built index directory: ``index.json`` plus the manifest of each modality present."""

    directory: Path
    info: dict[str, Any]
    manifests: dict[str, IndexManifest] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "IndexLayout":
        """Read an index directory (or a version root's current version) and validate every manifest."""
        directory = resolve_index_dir(directory)
        path = directory / INFO_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no index info (not an index built by `dialclip index build`, "
                                    f"or the build did not finish)")
        info = json.loads(path.read_text(encoding="utf-8"))
        if info.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {info.get('format_version')!r} is not {FORMAT_VERSION}")
        manifests = {t: IndexManifest.load(directory / t) for t in info.get("modalities", {})}
        if not manifests:
            raise ValueError(f"{path}: index has no modality")
        for t, m in manifests.items():
            if m.identity != info["identity"]:
                raise IndexMismatchError(f"{directory / t}: manifest identity differs from {path}")
        return cls(directory, info, manifests)

    @property
    def identity(self) -> dict[str, Any]:
        return self.info["identity"]

    @property
    def index_id(self) -> str:
        """The version id (indexes written before versions: a digest of their index.json)."""
        return self.info.get("index_id") or "sha-" + hashlib.sha256(
            json.dumps(self.info, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def num_shards(self) -> int:
        return max(len(m.shards) for m in self.manifests.values())

    @property
    def dim(self) -> int:
        dims = {m.dim for m in self.manifests.values()}
        if len(dims) != 1:
            raise ValueError(f"{self.directory}: modalities have different dims {sorted(dims)}")
        return dims.pop()


def write_index(out: str | os.PathLike, modalities: dict[str, tuple[Sequence[str], np.ndarray, pa.Table | None]],
                identity: dict[str, Any], shards: int = 1, kind: str = "flat", params: dict[str, Any] | None = None,
                corpora: Sequence[dict] = (), checkpoint: str | None = None, overwrite: bool = False,
                use_gpu: bool | None = None, versioned: bool = False, activate_new: bool | None = None,
                index_id: str | None = None) -> IndexLayout:
    """Write ``{target: (ids, vectors, metadata)}`` as sub-indexes plus ``index.json``, atomically.

    ``identity`` should be ``checkpoint_identity(checkpoint)`` of the checkpoint whose
    candidate encoders produced ``vectors`` (serving compares it with what it loads).
    ``versioned``: ``out`` is a version root; the index goes to ``out/<index_id>/`` and becomes
    ``CURRENT`` when ``activate_new`` (default: only when the root serves nothing yet).
    """
    from dialclip_ray.index import build_sharded_index

    index_id = index_id or new_index_id()
    if versioned:
        root = Path(out).resolve()
        root.mkdir(parents=True, exist_ok=True)
        layout = write_index(root / index_id, modalities, identity, shards, kind, params, corpora, checkpoint,
                             False, use_gpu, index_id=index_id)
        if activate_new or (activate_new is None and not is_version_root(root)):
            activate(root, layout.directory.name)
        return layout
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    bad = [t for t in modalities if t not in TARGETS]
    if bad or not modalities:
        raise ValueError(f"modalities must be a non-empty subset of {TARGETS}, got {list(modalities)}")
    with staging_dir(out) as tmp:
        summary = {}
        for target, (ids, vectors, metadata) in modalities.items():
            manifest = build_sharded_index(ids, vectors, tmp / target, shards=min(shards, len(ids)), kind=kind,
                                           params=params, identity=identity, metadata=metadata, use_gpu=use_gpu,
                                           index_id=index_id)
            summary[target] = {"count": manifest.total_count, "shards": len(manifest.shards), "dim": manifest.dim}
        info = {"format_version": FORMAT_VERSION, "index_id": index_id, "identity": identity, "checkpoint": checkpoint,
                "corpora": list(corpora), "kind": kind, "params": dict(params or {}), "modalities": summary,
                "created": datetime.now(timezone.utc).isoformat()}
        atomic_write_text(tmp / INFO_FILE, json.dumps(info, indent=2))  # last: its presence = complete
    return IndexLayout.load(out)
