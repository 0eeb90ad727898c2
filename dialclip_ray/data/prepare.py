"""``dialclip data prepare``: convert PhotoChat or MMDialog files into the canonical dataset dir.

Every image a row references (targets, context images, candidate pools) is located
with the image patterns, confined to the image root and probed (header, pixel
bound, verify) before anything is written, so training never meets a missing
or hostile file. With ``on_error="skip"`` bad records and the rows that reference
a bad image are dropped and counted in ``meta.json``; with ``fail`` the first
problem aborts and nothing is written.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, Sequence

from tqdm import tqdm

from dialclip_ray.data.errors import DataError, ErrorPolicy, OnError
from dialclip_ray.data.images import (DEFAULT_EXTENSIONS, DEFAULT_MAX_PIXELS, ImageLocator, check_relative_name,
                                       image_size)
from dialclip_ray.data.schema import ImageRef, LoadedSource, check_output_dir, write_dataset_dir

Format = Literal["photochat", "mmdialog"]


def _load(fmt: str, input: Path, policy: ErrorPolicy, progress: bool) -> tuple[LoadedSource, tuple[str, ...]]:
    if fmt == "photochat":
        from dialclip_ray.data.photochat import DEFAULT_PATTERNS, load_photochat
        return load_photochat(input, policy, progress), DEFAULT_PATTERNS
    if fmt == "mmdialog":
        from dialclip_ray.data.mmdialog import DEFAULT_PATTERNS, load_mmdialog
        return load_mmdialog(input, policy, progress), DEFAULT_PATTERNS
    raise ValueError(f"unknown format {fmt!r}; expected photochat or mmdialog")


def _row_images(row: dict) -> set[str]:
    ids = {i for turn in row["context"] for i in turn["image_ids"]}
    if row["target_type"] == "image":
        ids.add(row["target_id"])
        ids.update(row["candidates"] or ())
    return ids


def _locate(locator: ImageLocator, ref: ImageRef) -> str:
    """Try the first reference's pattern hints, then those of later references (e.g. other split dirs)."""
    missing: DataError | None = None
    for hints in (ref.hints, *ref.alt_hints):
        try:
            return locator.find(ref.image_id, hints, file=ref.file, record=ref.record, field=ref.field)
        except DataError as err:
            if err.kind != "image_missing":
                raise
            missing = missing or err
    assert missing is not None
    raise missing


def probe_image(locator: ImageLocator, ref: ImageRef, max_pixels: int, check: bool = True) -> dict | DataError:
    """The images-table row of ``ref``'s image (path found by the patterns, size from the header), or its error.

    ``check=False`` skips the file system: the path is the first pattern's name (still confined to the
    root by name), width and height are left empty.
    """
    if not check:
        name = locator.candidates(ref.image_id, ref.hints)[0]
        try:
            check_relative_name(name, record=ref.record, field=ref.field)
        except DataError as err:
            return DataError(ref.file, ref.record, ref.field, f"image {ref.image_id!r} -> {name!r}: {err.message}",
                             kind=err.kind)
        return {"image_id": ref.image_id, "path": name, "width": None, "height": None}
    try:
        rel = _locate(locator, ref)
        w, h = image_size(locator.root / rel, max_pixels, record=ref.record, field=ref.field)
    except DataError as err:
        if err.kind == "image_missing":
            return err
        # name the source file too: the image file alone does not say who referenced it
        return DataError(err.file, err.record, err.field, f"{err.message} (referenced in {ref.file})", kind=err.kind)
    return {"image_id": ref.image_id, "path": rel, "width": w, "height": h}


def default_image_root(format: str, input: Path, images: str | Path | None) -> Path:
    """``images``, or for MMDialog the input root (images live at ROOT/<split>/<key>.jpg beside the split dirs)."""
    if images is None:
        if format != "mmdialog":
            raise ValueError("--images (the image root) is required for PhotoChat")
        from dialclip_ray.data.mmdialog import CONVERSATIONS
        images = input.parent.parent if input.is_file() else \
            input.parent if (input / CONVERSATIONS).is_file() else input
    root = Path(images)
    if not root.is_dir():
        raise FileNotFoundError(f"image root {root} is not a directory")
    return root


def prepare(format: Format, input: str | Path, images: str | Path | None, out: str | Path,
            on_error: OnError = "fail", image_patterns: Sequence[str] | None = None,
            extensions: Sequence[str] = DEFAULT_EXTENSIONS, max_pixels: int = DEFAULT_MAX_PIXELS,
            progress: bool = True, workers: int = 8, check_images: bool = True) -> dict:
    """Convert ``input`` into the dataset dir ``out``; returns the meta written to ``out/meta.json``.

    ``images`` is the image root (MMDialog default: the input root, where ``<split>/<key>.jpg`` live).
    ``check_images=False`` writes the first pattern's file name for every image without opening it.
    Everything is held in memory; for the full MMDialog train split use
    :func:`dialclip_ray.data.mmdialog_stream.convert_mmdialog` (what the CLI runs for MMDialog).
    """
    policy = ErrorPolicy(on_error)
    input = Path(input)
    check_output_dir(out)  # fail before the long work, not after it
    source, default_patterns = _load(format, input, policy, progress)
    root = default_image_root(format, input, images)
    locator = ImageLocator(root, tuple(image_patterns or default_patterns), tuple(extensions))

    users: dict[str, list[int]] = defaultdict(list)
    for n, row in enumerate(source.examples):
        for image_id in _row_images(row):
            users[image_id].append(n)
    missing_refs = [i for i in users if i not in source.images]
    if missing_refs:  # a loader bug, not bad input
        raise RuntimeError(f"images used by rows but never referenced: {missing_refs[:5]}")

    def probe(image_id: str) -> dict | DataError:
        return probe_image(locator, source.images[image_id], max_pixels, check_images)

    image_rows: list[dict] = []
    bad_rows: set[int] = set()
    ids = sorted(users)
    pool = ThreadPoolExecutor(max(1, workers))  # header reads are I/O bound
    try:
        with tqdm(total=len(ids), desc="checking images", unit="img", disable=not progress) as bar:
            for start in range(0, len(ids), 1024):  # chunks: a failure does not wait for a million probes
                chunk = ids[start:start + 1024]
                for image_id, result in zip(chunk, pool.map(probe, chunk)):
                    if isinstance(result, DataError):
                        policy.handle(result)
                        bad_rows.update(users[image_id])
                    else:
                        image_rows.append(result)
                bar.update(len(chunk))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

    rows = [r for n, r in enumerate(source.examples) if n not in bad_rows]
    kept_images: set[str] = set()
    for r in rows:
        kept_images.update(_row_images(r))
    image_rows = [r for r in image_rows if r["image_id"] in kept_images]
    used_texts = {r["target_id"] for r in rows if r["target_type"] == "text"}
    used_texts.update(c for r in rows if r["target_type"] == "text" for c in r["candidates"] or ())
    text_rows = [{"text_id": k, "text": v} for k, v in source.texts.items() if k in used_texts]

    per_split: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        per_split[r["split"]][r["target_type"]] += 1
    meta = {
        "source": format,
        "input": str(input.resolve()),
        "input_files": source.files,
        "image_root": str(locator.root),
        "image_patterns": list(locator.patterns),
        "max_pixels": max_pixels,
        "image_check": check_images,
        "counts": {"examples": len(rows), "images": len(image_rows), "texts": len(text_rows),
                   "by_split": {s: dict(c) for s, c in sorted(per_split.items())}},
        "skipped": {**policy.report(), "examples_dropped_for_images": len(bad_rows)},
    }
    write_dataset_dir(out, rows, image_rows, text_rows, meta)
    return meta
