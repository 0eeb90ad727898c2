"""Where the examples of a dataset dir live: one ``examples.parquet`` or a directory of shards.

``prepare`` (everything in memory) writes ``examples.parquet``; the streaming MMDialog
converter writes ``examples/part-00000.parquet, part-00001.parquet, ...`` (one per input
segment, in input order). Both hold rows of ``EXAMPLES_SCHEMA``; readers go through
:func:`examples_files` / :func:`read_examples` and never care which layout they got.
``images.parquet`` and ``texts.parquet`` are single files in both layouts.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dialclip_ray.data.schema import EXAMPLES_SCHEMA

EXAMPLES_FILE = "examples.parquet"
EXAMPLES_DIR = "examples"
SHARD_GLOB = "part-*.parquet"


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def examples_files(directory: str | os.PathLike) -> list[Path]:
    """The Parquet files holding the examples of ``directory``, in row order.

    Hidden files (``.part-00003.parquet.tmp``: a shard being written) are never listed.
    """
    directory = Path(directory)
    single, shards = directory / EXAMPLES_FILE, directory / EXAMPLES_DIR
    if single.is_file():
        if shards.is_dir():
            raise ValueError(f"{directory} has both {EXAMPLES_FILE} and {EXAMPLES_DIR}/: which one is the dataset?")
        return [single]
    if shards.is_dir():
        return sorted(p for p in shards.glob(SHARD_GLOB) if p.is_file() and not p.name.startswith("."))
    raise FileNotFoundError(f"{directory} has no {EXAMPLES_FILE} and no {EXAMPLES_DIR}/ directory of shards")


def read_examples(directory: str | os.PathLike) -> pa.Table:
    """All examples of ``directory`` as one table of ``EXAMPLES_SCHEMA`` (shards concatenated in order)."""
    files = examples_files(directory)
    if not files:
        return EXAMPLES_SCHEMA.empty_table()
    tables = [pq.read_table(f) for f in files]
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)
