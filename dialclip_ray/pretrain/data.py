"""Reading ``ROOT/captions.parquet`` and its images for CLIP pretraining.

Captions are tokenised once up front and, without augmentation, each image is
decoded and transformed once and kept (as uint8 before normalisation, see
``CaptionDataset``; the first use returns the same values as later ones): on two CPU cores the per-step PIL and
tokenizer work would otherwise cost a noticeable share of a few-minute budget.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq
import torch

from dialclip_ray.data.errors import DataError
from dialclip_ray.data.images import open_image, resolve_image_path

CAPTIONS_FILE = "captions.parquet"
META_FILE = "synth_meta.json"
REQUIRED_COLUMNS = ("image_id", "path", "caption", "split")
MAX_IMAGE_PIXELS = 4096 * 4096  # synthetic scenes are 64 px; anything huge is a bad record


@dataclass(frozen=True)
class CaptionRow:
    image_id: str
    path: str
    caption: str
    split: str


def read_captions(root: str | Path) -> list[CaptionRow]:
    """All rows of ``ROOT/captions.parquet``, validated (non-empty strings in every field)."""
    file = Path(root) / CAPTIONS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: captions file not found (expected from `dialclip data synth`)")
    table = pq.read_table(file)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(file, None, ",".join(missing), f"missing column(s); have {table.column_names}")
    cols = {c: table.column(c).to_pylist() for c in REQUIRED_COLUMNS}
    rows = []
    for i in range(table.num_rows):
        values = {c: cols[c][i] for c in REQUIRED_COLUMNS}
        for c, v in values.items():
            if not isinstance(v, str) or not v.strip():
                raise DataError(file, f"row {i} (image_id={values['image_id']!r})", c,
                                f"must be a non-empty string, got {v!r}")
        rows.append(CaptionRow(**values))
    return rows


def corpus_fingerprint(root: str | Path) -> str:
    """Identity of the corpus: the generator's ``synth_meta.json`` if present, else the captions bytes."""
    root = Path(root)
    meta = root / META_FILE
    digest = hashlib.sha256()
    if meta.is_file():
        try:
            digest.update(json.dumps(json.loads(meta.read_text()), sort_keys=True).encode())
        except json.JSONDecodeError as exc:
            raise DataError(meta, None, None, f"not valid JSON ({exc})") from exc
    else:
        with open(root / CAPTIONS_FILE, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _split_normalize(transform: Callable[[Any], torch.Tensor]):
    """(transform up to ``ToTensor``, the trailing ``Normalize``) of a torchvision ``Compose`` ending in
    ``ToTensor(), Normalize(...)`` (open_clip's eval transform); (None, None) for anything else."""
    from torchvision import transforms as T

    steps = getattr(transform, "transforms", None)
    if not steps or len(steps) < 2 or not isinstance(steps[-1], T.Normalize) or not isinstance(steps[-2], T.ToTensor):
        return None, None
    return T.Compose(steps[:-1]), steps[-1]


class CaptionDataset(torch.utils.data.Dataset):
    """(image tensor, caption tokens) pairs; one item per caption row.

    Cached images are kept as uint8 before normalisation when the transform ends in
    ``ToTensor, Normalize`` (``ToTensor`` of an 8-bit image is exactly k/255, so the cached
    tensor gives bit-identical inputs at a quarter of float32's memory: 12 KB per 64 px image),
    otherwise as float16.
    """

    def __init__(self, root: str | Path, rows: list[CaptionRow], transform: Callable[[Any], torch.Tensor],
                 tokenizer: Callable[[list[str]], torch.Tensor], cache_images: bool = True):
        self.root = Path(root)
        self.rows = rows
        self.transform = transform
        self.cache_images = cache_images
        self.tokens = tokenizer([r.caption for r in rows]) if rows else torch.zeros(0, 1, dtype=torch.long)
        self._cache: dict[str, torch.Tensor] = {}
        self._to_tensor, self._normalize = _split_normalize(transform) if cache_images else (None, None)

    def __len__(self) -> int:
        return len(self.rows)

    def _decode(self, cached: torch.Tensor) -> torch.Tensor:
        if cached.dtype == torch.uint8:
            return self._normalize(cached.float() / 255)
        return cached.float()

    def image(self, i: int) -> torch.Tensor:
        rel = self.rows[i].path
        if self.cache_images and rel in self._cache:
            return self._decode(self._cache[rel])
        record = f"image_id={self.rows[i].image_id!r} in {self.root / CAPTIONS_FILE}"
        path = resolve_image_path(self.root, rel, record=record, field="path")
        img = open_image(path, MAX_IMAGE_PIXELS, record=record, field="path")
        if not self.cache_images:
            return self.transform(img)
        if self._to_tensor is not None:
            raw = self._to_tensor(img)
            cached = (raw * 255).round().to(torch.uint8)
            if not torch.equal(cached.float() / 255, raw):  # not an 8-bit image after all: keep it exact
                cached = self._normalize(raw).half()
        else:
            cached = self.transform(img).half()
        self._cache[rel] = cached
        return self._decode(cached)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(i), self.tokens[i]


def held_out_pairs(rows: list[CaptionRow], splits: tuple[str, ...]) -> list[CaptionRow]:
    """One caption per held-out image (its first in file order), images in first-seen order."""
    seen: dict[str, CaptionRow] = {}
    for r in rows:
        if r.split in splits and r.image_id not in seen:
            seen[r.image_id] = r
    return list(seen.values())
