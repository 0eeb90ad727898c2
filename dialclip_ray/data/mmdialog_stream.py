"""Streaming MMDialog converter: the full training split (1,059,117 conversations) in bounded memory.

``load_mmdialog`` + ``prepare`` hold a split in memory. This converter never does:

1. **Plan.** Each ``conversations.json`` is cut into *segments* of about ``segment_bytes``
   at record boundaries. JSON Lines: at line ends (one pass counting newlines). A JSON array:
   one pass of an incremental decoder (``json.JSONDecoder.raw_decode`` on a buffer refilled
   in chunks, so the file is never loaded) that also validates the whole array, as the
   in-memory loader does. The plan is saved, so a restarted run does not plan again.
2. **Convert** every segment in a process pool (``processes``; 0 = in this process): parse
   records with the same ``parse_conversation`` as the in-memory loader, check the images the
   rows use (optional, ``check_images``), and write the rows in batches of at most
   ``batch_rows`` rows / about ``batch_bytes`` bytes to the segment's ``examples`` shard. Each
   image, text and conversation id the segment's rows use goes once to a side file, in
   batches split into hash buckets; texts are held only while their rows are pending. A
   segment is built in a hidden staging dir and renamed to ``segments/<n>/`` when complete
   (``fsio.staging_dir``), with ``done.json`` recording the file sizes, so a killed run
   never takes a partial shard for a good one. Restarting the same command continues from
   the done segments.
3. **Finish**, one bucket at a time (memory ~ input size / buckets): duplicate conversation
   ids across segments, one ``images.parquet`` and one ``texts.parquet`` (deduplicated), the
   shards linked into ``examples/``, ``meta.json``; the dataset dir is published atomically
   (``fsio.staging_dir``) and the work dir removed.

Peak memory is bounded by the batch size, the ids seen in one segment (``segment_bytes``) and
the bucket size (one bucket per ~16 MB of input), never by the input size. Work happens in
``.<out>.convert/`` beside the output dir.

Same errors as the in-memory path (file, record, field; ``--on-error skip`` counts them by
kind). Differences, all documented in the CLI help: a structural JSON error (array not
closed, bad separator) in any file is reported before record errors (the in-memory loader
reads files in order); an image is looked up in its own split directory first, then in the
other split directories of the input.
"""

from __future__ import annotations

import codecs
import fcntl
import gc
import heapq
import json
import multiprocessing
import os
import re
import resource
import shutil
import time
import zlib
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from dialclip_ray.data.errors import DataError, ErrorPolicy, OnError
from dialclip_ray.data.images import DEFAULT_EXTENSIONS, DEFAULT_MAX_PIXELS, ImageLocator
from dialclip_ray.data.jsonio import ends_early_error, first_char, json_line_error, malformed_error
from dialclip_ray.data.layout import EXAMPLES_DIR, shard_name
from dialclip_ray.data.mmdialog import DEFAULT_PATTERNS, parse_conversation, split_dirs
from dialclip_ray.data.prepare import _row_images, default_image_root, probe_image
from dialclip_ray.data.schema import (EXAMPLES_SCHEMA, FORMAT_VERSION, IMAGES_SCHEMA, META_FILE, TEXTS_SCHEMA,
                                      ImageRef, check_output_dir)
from dialclip_ray.fsio import atomic_write, atomic_write_text, staging_dir

WORK_VERSION = 1
DEFAULT_SEGMENT_BYTES = 32 << 20
DEFAULT_BATCH_ROWS = 2048
DEFAULT_BATCH_BYTES = 16 << 20
BUCKET_BYTES = 16 << 20  # input bytes per finishing bucket
READ_CHUNK = 1 << 20

IDS_SCHEMA = pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("label", pa.string(), nullable=False),
                        pa.field("seq", pa.int64(), nullable=False)])
BAD_SCHEMA = pa.schema([pa.field("image_id", pa.string(), nullable=False),
                        pa.field("kind", pa.string(), nullable=False),
                        pa.field("message", pa.string(), nullable=False)])
SIDE = {"images": (IMAGES_SCHEMA, "image_id"), "texts": (TEXTS_SCHEMA, "text_id"), "ids": (IDS_SCHEMA, "key"),
        "bad": (BAD_SCHEMA, "image_id")}


# ----------------------------------------------------------------------------------------------------------------
# Incremental JSON array reader


_WS = re.compile(r"[ \t\n\r]*")
_NUMBER_TAIL = re.compile(r"[0-9.eE+\-]*")


class ArrayReader:
    """The elements of a JSON array in a file, decoded one at a time from a buffer of ~``chunk`` characters.

    ``start=None``: the whole file (expects ``[``, validates separators, the closing ``]`` and that
    nothing follows). ``start``/``end`` byte offsets: a segment made by the planner, starting at an
    element and ending at the next segment's first element (or the end of the file).
    Decoding errors name the file and the line/column; a file that stops inside the array
    "ends early".
    """

    def __init__(self, path: str | os.PathLike, start: int | None = None, end: int | None = None,
                 chunk: int = READ_CHUNK):
        self.path = Path(path)
        self.whole = start is None
        self.size = os.path.getsize(self.path)
        self.fh = open(self.path, "rb")
        self.fh.seek(start or 0)
        self.remaining = None if end is None else end - (start or 0)
        self.chunk = chunk
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self.dec = json.JSONDecoder()
        self.buf = ""
        self.eof = False
        self.read_byte = start or 0
        self.lines = 0          # newlines before buf[0]
        self.col0 = 0           # characters after the last newline before buf[0]
        self.anchor = (0, start or 0)  # (index in buf, its byte offset in the file)

    def close(self) -> None:
        self.fh.close()

    def __enter__(self) -> "ArrayReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- buffer ----------------------------------------------------------------------------------------------------
    def _refill(self, keep_from: int) -> int:
        """Drop ``buf[:keep_from]``, append the next chunk; returns keep_from's new index (0)."""
        dropped = self.buf[:keep_from]
        if dropped:
            nl = dropped.count("\n")
            if nl:
                self.lines += nl
                self.col0 = len(dropped) - dropped.rfind("\n") - 1
            else:
                self.col0 += len(dropped)
            a_idx, a_byte = self.anchor
            self.anchor = (0, a_byte + len(self.buf[a_idx:keep_from].encode("utf-8")))
            self.buf = self.buf[keep_from:]
        while not self.eof:
            want = max(self.chunk, len(self.buf))  # doubling: one huge element is not re-parsed per chunk
            if self.remaining is not None:
                want = min(want, self.remaining)
            data = self.fh.read(want) if want > 0 else b""
            if self.remaining is not None:
                self.remaining -= len(data)
            pending = len(self.decoder.getstate()[0])
            try:
                text = self.decoder.decode(data, final=not data)
            except UnicodeDecodeError as exc:
                raise DataError(self.path, f"byte {self.read_byte - pending + exc.start}", None,
                                f"not UTF-8 text: {exc.reason}", kind="malformed_json") from None
            self.read_byte += len(data)
            if not data:
                self.eof = True
            if text:
                self.buf += text
                break
        return 0

    def byte_at(self, i: int) -> int:
        """File byte offset of ``buf[i]`` (calls must not go backwards)."""
        a_idx, a_byte = self.anchor
        b = a_byte + len(self.buf[a_idx:i].encode("utf-8"))
        self.anchor = (i, b)
        return b

    def _where(self, i: int) -> tuple[int, int]:
        last = self.buf.rfind("\n", 0, i)
        line = self.lines + self.buf.count("\n", 0, i) + 1
        return line, (i - last if last >= 0 else self.col0 + i + 1)

    def _skip(self, i: int) -> int:
        while True:
            i = _WS.match(self.buf, i).end()
            if i < len(self.buf) or self.eof:
                return i
            i = self._refill(i)

    # -- errors ----------------------------------------------------------------------------------------------------
    def _malformed(self, i: int, msg: str) -> DataError:
        return malformed_error(self.path, *self._where(i), msg)

    def _ends_early(self, detail: str) -> DataError:
        end = len(self.buf.rstrip())
        return ends_early_error(self.path, *self._where(end), f"{self.size} bytes", detail)

    # -- elements --------------------------------------------------------------------------------------------------
    def _decode(self, i: int) -> tuple[Any, int]:
        while True:
            try:
                obj, end = self.dec.raw_decode(self.buf, i)
            except json.JSONDecodeError as exc:
                cut = exc.msg.startswith("Unterminated string") or exc.pos >= len(self.buf) - 16
                if cut and not self.eof:  # maybe only the buffer ends here: read on and decode again
                    i = self._refill(i)
                    continue
                if self.eof and (exc.msg.startswith("Unterminated string") or exc.pos >= len(self.buf.rstrip())):
                    line, col = self._where(exc.pos)
                    raise self._ends_early(f"{exc.msg} at line {line} column {col}") from None
                raise self._malformed(exc.pos, exc.msg) from None
            if not self.eof and (end >= len(self.buf) or (isinstance(obj, (int, float)) and not isinstance(obj, bool)
                                                          and _NUMBER_TAIL.fullmatch(self.buf, end))):
                i = self._refill(i)  # a bare number could go on in the next chunk ("0." + "5")
                continue
            return obj, end

    def elements(self, first_index: int = 0) -> Iterator[tuple[int, int, Any]]:
        """(array index, byte offset of the element, element) for each element, in order."""
        self._refill(0)
        i = self._skip(0)
        if self.whole:
            if i >= len(self.buf):
                return
            if self.buf[i] != "[":
                raise self._malformed(i, f"expected a JSON array, found {self.buf[i]!r}")
            i = self._skip(i + 1)
            if i >= len(self.buf):
                raise self._ends_early("the array is not closed")
            if self.buf[i] == "]":
                self._trailing(i + 1)
                return
        index = first_index
        while i < len(self.buf):
            start = self.byte_at(i)
            obj, i = self._decode(i)
            yield index, start, obj
            index += 1
            i = self._skip(i)
            if i >= len(self.buf):
                if self.whole:
                    raise self._ends_early("the array is not closed: expected ',' or ']' after an element")
                return
            if self.buf[i] == ",":
                i = self._skip(i + 1)
                if i >= len(self.buf) and self.whole:
                    raise self._ends_early("expected an element after ','")
            elif self.buf[i] == "]":
                if self.whole:
                    self._trailing(i + 1)
                return
            else:
                raise self._malformed(i, "Expecting ',' delimiter")

    def _trailing(self, i: int) -> None:
        i = self._skip(i)
        if i < len(self.buf):
            raise self._malformed(i, "Extra data")


# ----------------------------------------------------------------------------------------------------------------
# Plan


@dataclass(frozen=True)
class Segment:
    """Records ``[start, end)`` (byte offsets) of one input file; ``index`` orders shards globally."""

    index: int
    file: str
    split: str
    split_dir: str
    form: str   # "jsonl" | "array"
    start: int
    end: int
    first: int  # array: index of the first element; jsonl: number of lines before ``start``


def _plan_jsonl(path: Path, segment_bytes: int) -> list[tuple[int, int, int]]:
    size = path.stat().st_size
    bounds = [0]
    with open(path, "rb") as fh:
        target = segment_bytes
        while target < size:
            fh.seek(target - 1)
            fh.readline()  # to the end of the line holding byte target-1
            b = fh.tell()
            if b >= size:
                break
            bounds.append(b)
            target = b + segment_bytes
        bounds.append(size)
        out, lines = [], 0
        for start, end in zip(bounds, bounds[1:]):
            out.append((start, end, lines))
            fh.seek(start)
            left = end - start
            while left > 0:
                block = fh.read(min(left, 8 << 20))
                lines += block.count(b"\n")
                left -= len(block)
    return out


def _plan_array(path: Path, segment_bytes: int) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    seg_start = seg_first = None
    with ArrayReader(path) as reader:
        for index, start, _ in reader.elements():
            if seg_start is None:
                seg_start, seg_first = start, index
            elif start - seg_start >= segment_bytes:
                out.append((seg_start, start, seg_first))
                seg_start, seg_first = start, index
        size = reader.size
    if seg_start is not None:
        out.append((seg_start, size, seg_first))
    return out


def plan(files: Sequence[tuple[Path, str, str]], segment_bytes: int) -> list[Segment]:
    """Segments of every (file, split, split dir), in file order; raises DataError for a malformed array."""
    segments: list[Segment] = []
    for file, split, split_dir in files:
        head = first_char(file)
        if head == "":
            continue
        if head == "[":
            form, parts = "array", _plan_array(file, segment_bytes)
        elif head == "{":
            form, parts = "jsonl", _plan_jsonl(file, segment_bytes)
        else:
            raise DataError(file, None, None, f"expected a JSON array or JSON Lines of objects, file starts with "
                            f"{head!r}", kind="malformed_json")
        for start, end, first in parts:
            segments.append(Segment(len(segments), str(file), split, split_dir, form, start, end, first))
    return segments


# ----------------------------------------------------------------------------------------------------------------
# Convert one segment (runs in a worker process)


@dataclass(frozen=True)
class Options:
    on_error: str
    image_root: str
    patterns: tuple[str, ...]
    extensions: tuple[str, ...]
    max_pixels: int
    check_images: bool
    split_dirs: tuple[str, ...]  # every split dir of the input: fallback image locations
    batch_rows: int
    batch_bytes: int
    buckets: int
    image_threads: int
    work: str


def _bucket(key: str, buckets: int) -> int:
    return zlib.crc32(key.encode("utf-8")) % buckets


class _BucketedWriter:
    """A side table written in batches; each batch is ``buckets`` row groups, group ``b`` = keys hashing to ``b``.

    Bucket ``b`` of the file is row groups ``b, B + b, 2B + b, ...``: the finishing step reads one
    bucket of every segment at a time, so its memory is ~ input size / buckets.
    """

    def __init__(self, path: Path, name: str, buckets: int, batch_rows: int):
        self.schema, self.key = SIDE[name]
        self.path, self.buckets, self.batch_rows = path, buckets, batch_rows
        self.writer = pq.ParquetWriter(path, self.schema)
        self.rows: list[dict] = []
        self.batches = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.batch_rows:
            self.write_batch()

    def write_batch(self) -> None:
        rows, self.rows = self.rows, []
        if not rows:
            return
        table = pa.Table.from_pylist(rows, schema=self.schema)
        b = np.fromiter((_bucket(r[self.key], self.buckets) for r in rows), dtype=np.int64, count=len(rows))
        table = table.take(pa.array(np.argsort(b, kind="stable")))
        offsets = np.concatenate([[0], np.cumsum(np.bincount(b, minlength=self.buckets))])
        for k in range(self.buckets):
            part = table.slice(int(offsets[k]), int(offsets[k + 1] - offsets[k]))
            self.writer.write_table(part, row_group_size=max(1, part.num_rows))
        self.batches += 1

    def close(self) -> int:
        self.write_batch()
        self.writer.close()
        return self.batches


def _rewrite_side(path: Path, name: str, rows: list[dict], buckets: int) -> int:
    """Replace a side file (atomically) by ``rows`` in one bucketed batch; returns the batch count."""
    out = {}

    def write(tmp: Path) -> None:
        w = _BucketedWriter(tmp, name, buckets, max(1, len(rows)))
        for r in rows:
            w.rows.append(r)
        out["batches"] = w.close()

    atomic_write(path, write)
    return out["batches"]


def _row_bytes(rows: list[dict]) -> int:
    """Rough in-memory size of the largest row of one record (the last row has the longest context).

    Batches flush on it, so rows with 999 candidates or long histories make small batches.
    """
    last = rows[-1]
    n = 200 + len(last["current_text"]) + sum(48 + len(t["text"]) + 40 * len(t["image_ids"]) for t in last["context"])
    return n + 40 * max(len(r["candidates"] or ()) for r in rows)


def _records(seg: Segment) -> Iterator[tuple[str, Any]]:
    file = Path(seg.file)
    if seg.form == "array":
        with ArrayReader(file, seg.start, seg.end) as reader:
            for index, _, obj in reader.elements(seg.first):
                yield f"#{index}", obj
        return
    with open(file, "rb") as fh:
        fh.seek(seg.start)
        pos, lineno = seg.start, seg.first
        while pos < seg.end:
            raw = fh.readline()
            if not raw:
                return
            pos += len(raw)
            lineno += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(file, f"line {lineno}", None, f"not UTF-8 text: {exc.reason}",
                                kind="malformed_json") from None
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"line {lineno}", json_line_error(file, lineno, line, exc)


SEGMENT_FILES = ("examples", *SIDE)


def _segment_dir(work: Path, index: int) -> Path:
    return work / "segments" / f"{index:05d}"


class _SegmentWriter:
    """One segment's conversion. Memory: the pending batch, plus the ids (not the texts) already written.

    Texts and image references are held only for records whose rows are still pending; each
    image and text the kept rows use goes to the side files once, when first used.
    """

    def __init__(self, seg: Segment, opt: Options, directory: Path):
        self.seg, self.opt, self.dir = seg, opt, directory
        self.file = Path(seg.file)
        self.policy = ErrorPolicy(opt.on_error)
        self.locator = ImageLocator(Path(opt.image_root), opt.patterns, opt.extensions)
        self.seen: dict[str, str] = {}              # split/cid -> label (duplicates inside the segment)
        self.refs: dict[str, ImageRef] = {}         # image references of records with pending rows
        self.texts: dict[str, str] = {}             # texts of records with pending rows
        self.probed: dict[str, dict | DataError | None] = {}  # None: good and already written
        self.written_texts: set[str] = set()
        self.pending: list[dict] = []
        self.pending_bytes = 0
        self.records = self.examples = self.dropped = 0
        self.by_split: Counter = Counter()
        self.batches: list[int] = []
        side_rows = max(1024, opt.batch_rows * 8)
        self.side = {name: _BucketedWriter(directory / f"{name}.parquet", name, opt.buckets, side_rows)
                     for name in SIDE}
        self.threads = ThreadPoolExecutor(opt.image_threads) if opt.check_images and opt.image_threads > 1 else None

    def _probe(self, image_id: str) -> dict | DataError:
        ref = self.refs[image_id]
        if self.opt.check_images:  # own split dir first, then the other split dirs of the input
            own = ref.hints.get("split")
            ref = replace(ref, alt_hints=[{"split": d} for d in self.opt.split_dirs if d != own])
        return probe_image(self.locator, ref, self.opt.max_pixels, self.opt.check_images)

    def add_record(self, label: str, rec: Any) -> None:
        try:
            if isinstance(rec, DataError):
                raise rec
            rows, refs, texts = parse_conversation(rec, self.file, label, self.seg.split, self.seg.split_dir)
            cid = str(rec["conversation_id"])
            key = f"{self.seg.split}/{cid}"
            if key in self.seen:
                raise DataError(self.seg.file, label, "conversation_id", f"duplicate conversation_id {cid} in split "
                                f"{self.seg.split} (first at {self.seen[key]})", kind="duplicate_id")
        except DataError as err:
            self.policy.handle(err)
            return
        self.seen[key] = label
        self.side["ids"].add({"key": key, "label": label, "seq": self.records})
        self.records += 1
        if not rows:
            return
        for ref in refs:
            self.refs.setdefault(ref.image_id, ref)
        self.texts.update(texts)
        size = _row_bytes(rows)
        for i, row in enumerate(rows):
            self.pending.append(row)
            self.pending_bytes += size
            if len(self.pending) >= self.opt.batch_rows or self.pending_bytes >= self.opt.batch_bytes:
                # rows of this record may still follow: keep its references and texts
                self.flush(current=(refs, texts) if i + 1 < len(rows) else None)

    def flush(self, current: tuple[list[ImageRef], dict[str, str]] | None = None) -> None:
        rows, self.pending, self.pending_bytes = self.pending, [], 0
        if rows:
            self._write(rows)
        if current is None:
            self.refs, self.texts = {}, {}
        else:
            self.refs = {r.image_id: r for r in reversed(current[0])}
            self.texts = dict(current[1])

    def _write(self, rows: list[dict]) -> None:
        images = [_row_images(r) for r in rows]
        needed = [i for i in dict.fromkeys(i for ids in images for i in ids) if i not in self.probed]
        results = self.threads.map(self._probe, needed) if self.threads else map(self._probe, needed)
        for image_id, result in zip(needed, results):
            if isinstance(result, DataError):
                if self.opt.on_error == "fail":
                    raise result
                self.side["bad"].add({"image_id": image_id, "kind": result.kind, "message": str(result)})
            self.probed[image_id] = result
        kept = []
        for row, ids in zip(rows, images):
            if any(isinstance(self.probed[i], DataError) for i in ids):
                self.dropped += 1
                continue
            kept.append(row)
            for i in ids:
                info = self.probed[i]
                if info is not None:
                    self.side["images"].add(info)
                    self.probed[i] = None
            if row["target_type"] == "text":
                for t in (row["target_id"], *(row["candidates"] or ())):
                    if t not in self.written_texts:
                        self.written_texts.add(t)
                        self.side["texts"].add({"text_id": t, "text": self.texts[t]})
            self.by_split[(row["split"], row["target_type"])] += 1
        if kept:
            self.writer.write_table(pa.Table.from_pylist(kept, schema=EXAMPLES_SCHEMA))
            self.batches.append(len(kept))
            self.examples += len(kept)

    def run(self) -> dict:
        t0 = time.perf_counter()
        try:
            with pq.ParquetWriter(self.dir / "examples.parquet", EXAMPLES_SCHEMA) as self.writer:
                for label, rec in _records(self.seg):
                    self.add_record(label, rec)
                self.flush()
            side_batches = {name: w.close() for name, w in self.side.items()}
        finally:
            if self.threads:
                self.threads.shutdown(cancel_futures=True)
        for name in SEGMENT_FILES:
            with open(self.dir / f"{name}.parquet", "rb+") as fh:
                os.fsync(fh.fileno())
        return {"segment": asdict(self.seg), "records": self.records, "examples": self.examples,
                "by_split": _nest(self.by_split), "errors": {"counts": dict(self.policy.counts),
                                                             "examples": self.policy.examples},
                "dropped_for_images": self.dropped, "duplicates": [], "side_batches": side_batches,
                "sizes": {name: (self.dir / f"{name}.parquet").stat().st_size for name in SEGMENT_FILES},
                "batches": {"n": len(self.batches), "max_rows": max(self.batches, default=0)},
                "seconds": round(time.perf_counter() - t0, 3), "pid": os.getpid(),
                "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _nest(counter: Counter) -> dict:
    out: dict[str, dict[str, int]] = {}
    for (split, ttype), n in sorted(counter.items()):
        out.setdefault(split, {})[ttype] = n
    return out


def convert_segment(seg: Segment, opt: Options) -> dict:
    """Convert one segment into ``segments/<index>/`` (built in a hidden staging dir, renamed when complete).

    Returns the segment's done record (also written as ``done.json``). Raises DataError in fail mode.
    """
    target = _segment_dir(Path(opt.work), seg.index)
    with staging_dir(target, tag="building") as tmp:
        done = _SegmentWriter(seg, opt, tmp).run()
        atomic_write_text(tmp / "done.json", json.dumps(done, indent=1, sort_keys=True))
    return done


def _worker_init() -> None:
    gc.set_threshold(50_000, 20, 20)  # rows are short-lived garbage; the default threshold collects far too often


# ----------------------------------------------------------------------------------------------------------------
# Driver


def _fingerprint(files: Sequence[tuple[Path, str, str]], opt: Options, segment_bytes: int) -> dict:
    stats = []
    for file, split, split_dir in files:
        st = file.stat()
        stats.append({"file": str(file.resolve()), "split": split, "split_dir": split_dir, "size": st.st_size,
                      "mtime_ns": st.st_mtime_ns})
    keep = {k: v for k, v in asdict(opt).items() if k not in ("work", "image_threads")}
    fingerprint = {"work_version": WORK_VERSION, "files": stats, "options": keep, "segment_bytes": segment_bytes}
    return json.loads(json.dumps(fingerprint))  # as job.json reads back (tuples -> lists)


def _load_done(work: Path, seg: Segment) -> dict | None:
    """The done record of a finished segment, or None when it is missing, for another plan, or incomplete."""
    directory = _segment_dir(work, seg.index)
    try:
        done = json.loads((directory / "done.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if done.get("segment") != asdict(seg):
        return None
    for name in SEGMENT_FILES:
        try:
            if (directory / f"{name}.parquet").stat().st_size != done["sizes"][name]:
                return None
        except (OSError, KeyError):
            return None
    return done


def _prepare_work(work: Path, fingerprint: dict, restart: bool) -> None:
    """Create the work dir, or keep a compatible one from an interrupted run (else empty it)."""
    job = work / "job.json"
    try:
        same = json.loads(job.read_text(encoding="utf-8")) == fingerprint
    except (OSError, ValueError):
        same = False
    if restart or not same:
        for p in work.iterdir():
            if p.name != "lock":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    (work / "segments").mkdir(exist_ok=True)
    for p in (work / "segments").iterdir():
        if p.name.startswith("."):  # the staging dir of a segment whose worker was killed
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    if not job.is_file():
        atomic_write_text(job, json.dumps(fingerprint, indent=1, sort_keys=True))


def _read_bucket(work: Path, done: dict, name: str, bucket: int, buckets: int) -> pa.Table:
    pf = pq.ParquetFile(_segment_dir(work, done["segment"]["index"]) / f"{name}.parquet")
    groups = [k * buckets + bucket for k in range(done["side_batches"][name])]
    return pf.read_row_groups(groups) if groups else SIDE[name][0].empty_table()


def _used_ids(table: pa.Table) -> tuple[set[str], set[str]]:
    images: set[str] = set()
    texts: set[str] = set()
    for row in table.to_pylist():
        images.update(_row_images(row))
        if row["target_type"] == "text":
            texts.add(row["target_id"])
            texts.update(row["candidates"] or ())
    return images, texts


def _drop_records(work: Path, opt: Options, done: dict, dups: list[tuple[str, str, str]]) -> dict:
    """Skip mode: remove later duplicates (key, label, message) from a finished segment's shard and side files.

    Every file is replaced atomically and done.json last; running it again is harmless.
    """
    directory = _segment_dir(work, done["segment"]["index"])
    cids = pa.array([key.split("/", 1)[1] for key, _, _ in dups], pa.string())
    images: set[str] = set()
    texts: set[str] = set()
    by_split: Counter = Counter()
    n = 0

    def write(tmp: Path) -> None:
        nonlocal n
        src = pq.ParquetFile(directory / "examples.parquet")
        with pq.ParquetWriter(tmp, EXAMPLES_SCHEMA) as writer:
            for g in range(src.num_row_groups):
                table = src.read_row_group(g)
                table = table.filter(pc.invert(pc.is_in(table.column("dialog_id"), value_set=cids)))
                writer.write_table(table)
                i, t = _used_ids(table)
                images.update(i)
                texts.update(t)
                by_split.update(zip(table.column("split").to_pylist(), table.column("target_type").to_pylist()))
                n += table.num_rows

    atomic_write(directory / "examples.parquet", write)
    side_batches = dict(done["side_batches"])
    for name, used, key in (("images", images, "image_id"), ("texts", texts, "text_id")):
        rows = [r for r in pq.read_table(directory / f"{name}.parquet").to_pylist() if r[key] in used]
        side_batches[name] = _rewrite_side(directory / f"{name}.parquet", name, rows, opt.buckets)
    sizes = {name: (directory / f"{name}.parquet").stat().st_size for name in SEGMENT_FILES}
    done = dict(done, examples=n, by_split=_nest(by_split), sizes=sizes, side_batches=side_batches,
                duplicates=done["duplicates"] + [{"key": k, "label": lab, "message": m} for k, lab, m in dups])
    atomic_write_text(directory / "done.json", json.dumps(done, indent=1, sort_keys=True))
    return done


def _check_duplicates(work: Path, opt: Options, segments: list[Segment], dones: dict[int, dict]) -> None:
    """Conversation ids repeated across segments: fail -> DataError of the first repeat; skip -> drop repeats."""
    found: list[tuple[int, int, str, str, str]] = []  # (segment, seq, key, label, message)
    for b in range(opt.buckets):
        parts = [_read_bucket(work, dones[seg.index], "ids", b, opt.buckets) for seg in segments]
        table = pa.concat_tables(parts) if parts else IDS_SCHEMA.empty_table()
        counts = table.group_by("key", use_threads=False).aggregate([("key", "count")])
        repeated = counts.filter(pc.greater(counts.column("key_count"), 1)).column("key")
        if not len(repeated):  # the usual case: no Python loop over a bucket's ids
            continue
        first: dict[str, tuple[int, str]] = {}
        for seg, part in zip(segments, parts):
            part = part.filter(pc.is_in(part.column("key"), value_set=repeated))
            for key, label, seq in zip(*(part.column(c).to_pylist() for c in ("key", "label", "seq"))):
                if key not in first:
                    first[key] = (seg.index, label)
                    continue
                f_index, f_label = first[key]
                where = f_label if segments[f_index].file == seg.file else \
                    f"{f_label} of {segments[f_index].file}"
                split, cid = key.split("/", 1)
                found.append((seg.index, seq, key, label, f"duplicate conversation_id {cid} in split {split} "
                              f"(first at {where})"))
    if not found:
        return
    found.sort()
    if opt.on_error == "fail":
        index, _, _, label, message = found[0]
        raise DataError(segments[index].file, label, "conversation_id", message, kind="duplicate_id")
    by_segment: dict[int, list[tuple[str, str, str]]] = {}
    for index, _, key, label, message in found:
        if key not in {d["key"] for d in dones[index]["duplicates"]}:
            msg = str(DataError(segments[index].file, label, "conversation_id", message))
            by_segment.setdefault(index, []).append((key, label, msg))
    for index, dups in by_segment.items():
        dones[index] = _drop_records(work, opt, dones[index], dups)


def _merge_side(work: Path, opt: Options, segments: list[Segment], dones: dict[int, dict], name: str,
                path: Path) -> int:
    """One deduplicated table (first occurrence wins) from every segment's side file, bucket by bucket."""
    schema, key = SIDE[name]
    n = 0
    with pq.ParquetWriter(path, schema) as writer:
        for b in range(opt.buckets):
            parts = [_read_bucket(work, dones[seg.index], name, b, opt.buckets) for seg in segments]
            table = pa.concat_tables(parts) if parts else schema.empty_table()
            order = table.append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
            firsts = order.group_by(key, use_threads=False).aggregate([("_row", "min")]).column("_row_min")
            table = table.take(pa.array(np.sort(firsts.to_numpy())))  # input order of first occurrences
            writer.write_table(table)
            n += table.num_rows
    return n


def _bad_images(work: Path, opt: Options, segments: list[Segment], dones: dict[int, dict],
                max_examples: int) -> tuple[Counter, list[str]]:
    counts: Counter = Counter()
    first: list[tuple[int, str]] = []
    for b in range(opt.buckets):
        seen: set[str] = set()
        for seg in segments:
            table = _read_bucket(work, dones[seg.index], "bad", b, opt.buckets)
            for image_id, kind, message in zip(*(table.column(c).to_pylist() for c in ("image_id", "kind", "message"))):
                if image_id not in seen:
                    seen.add(image_id)
                    counts[kind] += 1
                    first = heapq.nsmallest(max_examples, [*first, (seg.index, message)])
    return counts, [m for _, m in first]


class _Lock:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            raise FileExistsError(f"another conversion is running in {path.parent}") from None

    def release(self) -> None:
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


MAX_DEFAULT_PROCESSES = 5  # <= ~300 MB each (interpreter + pyarrow + batches + a segment's ids), + the parent: < 2 GiB


def default_processes() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), MAX_DEFAULT_PROCESSES))


def convert_mmdialog(input: str | Path, out: str | Path, images: str | Path | None = None,
                     on_error: OnError = "fail", image_patterns: Sequence[str] | None = None,
                     extensions: Sequence[str] = DEFAULT_EXTENSIONS, max_pixels: int = DEFAULT_MAX_PIXELS,
                     check_images: bool = True, processes: int | None = None, image_threads: int = 8,
                     segment_bytes: int = DEFAULT_SEGMENT_BYTES, batch_rows: int = DEFAULT_BATCH_ROWS,
                     batch_bytes: int = DEFAULT_BATCH_BYTES, restart: bool = False, progress: bool = True) -> dict:
    """Convert MMDialog (root, split dir or conversations file; JSON array or JSON Lines) into the dataset dir ``out``.

    Same tables as ``prepare("mmdialog", ...)`` with the examples as ``examples/part-*.parquet``
    shards. ``processes``: worker processes (default: CPUs, at most 5; 0 = convert in this process).
    A run that was killed continues where it stopped when started again with the same input and
    options (``restart=True`` starts over). Returns the meta written to ``out/meta.json``.
    """
    t0 = time.perf_counter()
    ErrorPolicy(on_error)  # validates the mode
    for name, value in (("segment_bytes", segment_bytes), ("batch_rows", batch_rows), ("batch_bytes", batch_bytes)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    input, out = Path(input), Path(out)
    check_output_dir(out)
    files = split_dirs(input)
    root = default_image_root("mmdialog", input, images)
    patterns = tuple(image_patterns or DEFAULT_PATTERNS)
    locator = ImageLocator(root, patterns, tuple(extensions))
    locator.candidates("x", {"split": files[0][2]})  # an unknown pattern field fails now, not in a worker
    total_bytes = sum(f.stat().st_size for f, _, _ in files)
    buckets = 1 << max(4, min(12, (max(1, total_bytes // BUCKET_BYTES) - 1).bit_length()))
    work = out.absolute().parent / f".{out.name}.convert"
    processes = default_processes() if processes is None else max(0, processes)
    opt = Options(on_error, str(locator.root), patterns, tuple(extensions), max_pixels, check_images,
                  tuple(dict.fromkeys(d for _, _, d in files)), batch_rows, batch_bytes, buckets,
                  max(1, image_threads), str(work))
    fingerprint = _fingerprint(files, opt, segment_bytes)

    if work.is_dir() and not (work / "job.json").is_file() and any(p.name != "lock" for p in work.iterdir()):
        raise FileExistsError(f"{work} exists and is not a conversion work dir (no job.json); remove it")
    lock = _Lock(work / "lock")
    try:
        _prepare_work(work, fingerprint, restart)
        segments, t_plan = _load_or_plan(work, files, segment_bytes)
        dones, resumed, t_conv = _convert_segments(work, segments, opt, processes, progress)
        t_fin = time.perf_counter()
        _check_duplicates(work, opt, segments, dones)
        check_output_dir(out)
        meta = _publish(out, work, input, files, opt, segments, dones, resumed, processes, segment_bytes,
                        {"plan": t_plan, "convert": t_conv})
        meta["timings_s"]["finish"] = round(time.perf_counter() - t_fin, 3)
        meta["timings_s"]["total"] = round(time.perf_counter() - t0, 3)
        atomic_write_text(out / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        if not any((work / "segments").glob("*/done.json")):  # nothing to continue from: leave nothing behind
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        lock.release()
    return meta


def _load_or_plan(work: Path, files: list, segment_bytes: int) -> tuple[list[Segment], float]:
    """The segment plan of this job: reused from ``plan.json`` when a killed run left one."""
    plan_path = work / "plan.json"
    segments: list[Segment] | None = None
    if plan_path.is_file():
        try:
            segments = [Segment(**s) for s in json.loads(plan_path.read_text(encoding="utf-8"))]
        except (ValueError, TypeError):
            segments = None
    t_plan = time.perf_counter()
    if segments is None:
        segments = plan(files, segment_bytes)
        atomic_write_text(plan_path, json.dumps([asdict(s) for s in segments]))
    return segments, time.perf_counter() - t_plan


def _convert_segments(work: Path, segments: list[Segment], opt: Options, processes: int,
                      progress: bool) -> tuple[dict[int, dict], int, float]:
    """Convert every segment not finished by an earlier run; returns (done records, resumed count, seconds)."""
    dones: dict[int, dict] = {}
    for seg in segments:
        done = _load_done(work, seg)
        if done is not None:
            dones[seg.index] = done
    resumed = len(dones)
    todo = [s for s in segments if s.index not in dones]
    t_conv = time.perf_counter()
    with tqdm(total=len(segments), initial=resumed, desc="mmdialog segments", unit="seg",
              disable=not progress) as bar:
        if processes == 0 or len(todo) <= 1:
            for seg in todo:
                dones[seg.index] = convert_segment(seg, opt)
                bar.update(1)
        else:
            _run_pool(todo, opt, processes, dones, bar)
    return dones, resumed, time.perf_counter() - t_conv


def _publish(out: Path, work: Path, input: Path, files: list, opt: Options, segments: list[Segment],
             dones: dict[int, dict], resumed: int, processes: int, segment_bytes: int, timings: dict) -> dict:
    """Assemble shards and merged side tables in a staging dir and publish it as ``out``; returns the meta.

    ``meta.json`` is written into the staging dir too (its timings are completed by the caller).
    """
    with staging_dir(out.absolute(), tag="stream") as tmp:
        (tmp / EXAMPLES_DIR).mkdir()
        for seg in segments:
            src = _segment_dir(work, seg.index) / "examples.parquet"
            dst = tmp / EXAMPLES_DIR / shard_name(seg.index)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        n_images = _merge_side(work, opt, segments, dones, "images", tmp / "images.parquet")
        n_texts = _merge_side(work, opt, segments, dones, "texts", tmp / "texts.parquet")
        meta = _meta(input, files, opt, segments, dones, n_images, n_texts, resumed, processes,
                     segment_bytes, work, timings)
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def _run_pool(todo: list[Segment], opt: Options, processes: int, dones: dict[int, dict], bar: tqdm) -> None:
    """Segments in worker processes, at most 2 per process queued; fail mode raises the earliest segment's error."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a parent that may hold threads (Ray, torch)
    errors: dict[int, BaseException] = {}
    pool = ProcessPoolExecutor(max_workers=min(processes, len(todo)), mp_context=ctx, initializer=_worker_init)
    pending: dict[Future, Segment] = {}
    queue = list(reversed(todo))
    try:
        while queue or pending:
            while queue and not errors and len(pending) < 2 * processes:
                seg = queue.pop()
                pending[pool.submit(convert_segment, seg, opt)] = seg
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                seg = pending.pop(fut)
                exc = fut.exception()
                if exc is not None:
                    errors[seg.index] = exc
                    for other in [f for f, s in pending.items() if s.index > seg.index]:
                        other.cancel()
                    continue
                dones[seg.index] = fut.result()
                bar.update(1)
            pending = {f: s for f, s in pending.items() if not f.cancelled()}
            if errors:
                queue.clear()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    if errors:
        raise errors[min(errors)]


def _meta(input: Path, files, opt: Options, segments: list[Segment], dones: dict[int, dict], n_images: int,
          n_texts: int, resumed: int, processes: int, segment_bytes: int, work: Path, timings: dict) -> dict:
    counts: Counter = Counter()
    examples: list[str] = []
    by_split: dict[str, Counter] = {}
    n_examples = dropped = records = 0
    dup_examples: list[str] = []
    for seg in segments:
        d = dones[seg.index]
        counts.update(d["errors"]["counts"])
        examples.extend(d["errors"]["examples"])
        counts["duplicate_id"] += len(d["duplicates"])
        dup_examples.extend(x["message"] for x in d["duplicates"])
        n_examples += d["examples"]
        dropped += d["dropped_for_images"]
        records += d["records"]
        for split, c in d["by_split"].items():
            by_split.setdefault(split, Counter()).update(c)
    bad_counts, bad_examples = _bad_images(work, opt, segments, dones, 5)
    counts.update(bad_counts)
    counts = Counter({k: v for k, v in counts.items() if v})
    batches = [dones[s.index]["batches"]["max_rows"] for s in segments]
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": "mmdialog",
        "input": str(input.resolve()),
        "input_files": [str(f) for f, _, _ in files],
        "image_root": opt.image_root,
        "image_patterns": list(opt.patterns),
        "max_pixels": opt.max_pixels,
        "image_check": opt.check_images,
        "layout": {"examples": f"{EXAMPLES_DIR}/", "shards": len(segments)},
        "counts": {"examples": n_examples, "images": n_images, "texts": n_texts, "conversations": records,
                   "by_split": {s: dict(sorted(c.items())) for s, c in sorted(by_split.items())}},
        "skipped": {"total": sum(counts.values()), "by_reason": dict(sorted(counts.items())),
                    "examples": (examples + bad_examples + dup_examples)[:5],
                    "examples_dropped_for_images": dropped},
        "streaming": {"segments": len(segments), "resumed_segments": resumed, "processes": processes,
                      "segment_bytes": segment_bytes, "batch_rows": opt.batch_rows, "batch_bytes": opt.batch_bytes,
                      "max_batch_rows": max(batches, default=0), "buckets": opt.buckets,
                      "worker_max_rss_mb": max((dones[s.index].get("max_rss_mb", 0) for s in segments), default=0),
                      "forms": sorted({s.form for s in segments})},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }

