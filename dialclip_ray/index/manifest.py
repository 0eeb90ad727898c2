"""The index manifest: the one file that says what an index directory contains.

It is written last and atomically, so its presence means every shard file it
names is complete. Readers validate it (counts add up, shards are contiguous,
file names stay inside the directory, params fit the kind) before touching any
FAISS file, and errors name the manifest path and the offending field.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dialclip_ray.errors import format_validation_error
from dialclip_ray.fsio import atomic_write_text
from dialclip_ray.index.factory import IndexKind, KnobBounds, validate_params

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class IndexManifestError(ValueError):
    """A missing, unreadable or inconsistent index manifest (message names the path)."""


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index_file: str
    id_map_file: str
    count: int = Field(ge=0)
    offset: int = Field(ge=0, description="global label of the shard's first vector")

    @field_validator("index_file", "id_map_file")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        # Confine shard files to the index directory: no separators, no parent references.
        if not v or v in (".", "..") or "/" in v or "\\" in v or v.startswith("."):
            raise ValueError(f"shard file name must be a plain file name inside the index dir, got {v!r}")
        return v


class IndexManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = FORMAT_VERSION
    dim: int = Field(gt=0)
    metric: Literal["ip"] = "ip"
    normalized: bool = True
    kind: IndexKind
    params: dict[str, Any] = Field(default_factory=dict)
    shards: list[ShardEntry] = Field(min_length=1)
    total_count: int = Field(ge=0)
    identity: dict[str, Any] = Field(default_factory=dict, description="checkpoint/backbone identity of the vectors")
    search: dict[str, KnobBounds] = Field(default_factory=dict, description="query-time knobs (nprobe, "
                                          "ef_search): default and the bounds a request may ask")
    index_id: str | None = Field(None, description="version id of the index this sub-index belongs to "
                                 "(index.json's index_id); responses name it")
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @model_validator(mode="after")
    def _consistent(self) -> "IndexManifest":
        validate_params(self.kind, self.params)
        expected = 0
        for i, s in enumerate(self.shards):
            if s.offset != expected:
                raise ValueError(f"shards[{i}].offset={s.offset}, expected {expected} (shards must be contiguous)")
            expected += s.count
        if expected != self.total_count:
            raise ValueError(f"shard counts sum to {expected} but total_count={self.total_count}")
        names = [n for s in self.shards for n in (s.index_file, s.id_map_file)]
        if len(set(names)) != len(names):
            raise ValueError("shard file names must be unique")
        return self

    def save(self, index_dir: str | os.PathLike) -> Path:
        """Write ``manifest.json`` atomically (``fsio.atomic_write_text``)."""
        path = Path(index_dir) / MANIFEST_NAME
        atomic_write_text(path, self.model_dump_json(indent=2))
        return path

    @classmethod
    def load(cls, index_dir: str | os.PathLike, check_files: bool = True) -> "IndexManifest":
        """Read and validate ``<index_dir>/manifest.json``; raise ``IndexManifestError`` naming what is wrong."""
        path = Path(index_dir) / MANIFEST_NAME
        if not path.is_file():
            raise IndexManifestError(f"{path}: no index manifest (missing, or the index build did not finish)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise IndexManifestError(f"{path}: not valid JSON ({err})") from None
        try:
            manifest = cls.model_validate(raw)
        except ValidationError as err:
            raise IndexManifestError(format_validation_error(err, f"{path}: invalid manifest")) from None
        if check_files:
            for i, s in enumerate(manifest.shards):
                for name in (s.index_file, s.id_map_file):
                    if not (Path(index_dir) / name).is_file():
                        raise IndexManifestError(f"{path}: shards[{i}] file {name!r} is missing")
        return manifest
