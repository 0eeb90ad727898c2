"""Arrow schemas of the canonical dataset directory, and atomic writers.

The schemas are explicit (not inferred from the first rows) so that an empty
column, a null candidate list or a split without images still produces the same
Parquet types every reader expects. Writes go to a temporary name next to the
target and are renamed at the end, so a crash never leaves half a dataset.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from dialclip_ray.fsio import atomic_write, atomic_write_text, staging_dir

FORMAT_VERSION = 1
SOURCES = ("photochat", "mmdialog")
SPLITS = ("train", "dev", "test")

TURN_TYPE = pa.struct([
    pa.field("speaker", pa.int32(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("image_ids", pa.list_(pa.string()), nullable=False),
])

EXAMPLES_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("dialog_id", pa.string(), nullable=False),
    pa.field("context", pa.list_(TURN_TYPE), nullable=False),
    pa.field("current_text", pa.string(), nullable=False),
    pa.field("target_type", pa.string(), nullable=False),
    pa.field("target_id", pa.string(), nullable=False),
    pa.field("candidates", pa.list_(pa.string()), nullable=True),
])

IMAGES_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("width", pa.int32(), nullable=True),
    pa.field("height", pa.int32(), nullable=True),
])

TEXTS_SCHEMA = pa.schema([
    pa.field("text_id", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
])

TABLES = {"examples": EXAMPLES_SCHEMA, "images": IMAGES_SCHEMA, "texts": TEXTS_SCHEMA}
META_FILE = "meta.json"


def to_table(rows: pa.Table | Iterable[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts) or a table, as a table of exactly ``schema``."""
    if isinstance(rows, pa.Table):
        return rows.select(schema.names).cast(schema)
    return pa.Table.from_pylist(list(rows), schema=schema)


def write_table_atomic(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write Parquet atomically (``fsio.atomic_write``)."""
    return atomic_write(path, lambda p: pq.write_table(table, p))


def write_json_atomic(data: Any, path: str | os.PathLike) -> Path:
    """Write sorted, indented JSON atomically (``fsio.atomic_write_text``)."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def is_dataset_dir(path: str | os.PathLike) -> bool:
    """True for a directory this module wrote (has a meta.json with our format_version)."""
    meta = Path(path) / META_FILE
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("format_version") == FORMAT_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def check_output_dir(out_dir: str | os.PathLike) -> Path:
    """Refuse to replace anything but a dataset dir or an empty dir (called before long work starts)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; refusing to overwrite it")
    if out.is_dir() and any(out.iterdir()) and not is_dataset_dir(out):
        raise FileExistsError(f"{out} exists and is not a dataset directory (no {META_FILE} with "
                              f"format_version {FORMAT_VERSION}); refusing to overwrite it")
    return out


def write_dataset_dir(out_dir: str | os.PathLike, examples, images, texts, meta: Mapping[str, Any]) -> Path:
    """Write the three tables and meta.json into a temp dir beside ``out_dir``, then swap it into place.

    ``fsio.staging_dir``: an existing dataset dir is renamed aside, the new one renamed in,
    then the old one deleted: readers see the old or the new dataset, never a mix. A
    failure leaves ``out_dir`` as it was.
    """
    out = check_output_dir(out_dir).absolute()
    with staging_dir(out, tag="tmp") as tmp:
        tables = {name: to_table(rows, TABLES[name]) for name, rows in
                  (("examples", examples), ("images", images), ("texts", texts))}
        for name, table in tables.items():
            write_table_atomic(table, tmp / f"{name}.parquet")
        full_meta = {"format_version": FORMAT_VERSION,
                     "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **meta}
        full_meta["format_version"] = FORMAT_VERSION
        write_json_atomic(full_meta, tmp / META_FILE)
    return out


def read_meta(directory: str | os.PathLike) -> dict:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a dataset directory: {META_FILE} is missing")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r} is not {FORMAT_VERSION}")
    return meta


@dataclass
class ImageRef:
    """Where an image id was first referenced, so an image error can name file, record and field."""

    image_id: str
    file: str
    record: str
    field: str
    hints: dict[str, str] = dataclass_field(default_factory=dict)  # extra pattern fields (url_basename, split)
    alt_hints: list[dict[str, str]] = dataclass_field(default_factory=list)  # from later references, tried next


@dataclass
class LoadedSource:
    """What a loader hands to ``prepare``: example rows (EXAMPLES_SCHEMA dicts), image refs, texts."""

    source: str
    examples: list[dict] = dataclass_field(default_factory=list)
    images: dict[str, ImageRef] = dataclass_field(default_factory=dict)
    texts: dict[str, str] = dataclass_field(default_factory=dict)
    files: list[str] = dataclass_field(default_factory=list)

    def add_image(self, ref: ImageRef) -> None:
        first = self.images.setdefault(ref.image_id, ref)
        if first is not ref and ref.hints != first.hints and ref.hints not in first.alt_hints:
            first.alt_hints.append(ref.hints)
